-- Schema 10: outbox lanes. A message for a device that has a cloud identity of its own
-- (the azure-iot profile's `[[uplink.azure.devices]]`) goes out on that device's own
-- connection, not the gateway's: its row carries the device id in `lane` ('' is the
-- gateway's lane), and each connection reads only its lane, so a device whose identity
-- is refused or unreachable holds back its own messages and nobody else's.
ALTER TABLE outbox ADD COLUMN lane TEXT NOT NULL DEFAULT '';

CREATE INDEX outbox_lane_order ON outbox (lane, priority, seq);
