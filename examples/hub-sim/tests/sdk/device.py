"""Microsoft's device SDK (azure-iot-device, PyPI) against hub-sim: the referee.

Run by tests/referee.rs with the venv `cargo xtask test` makes. Arguments: one JSON
object (dps host, id scope, registration id, key or group key, CA file). Prints one JSON
event per line; exits non-zero with the SDK's exception when a step fails.
"""

import base64
import hashlib
import hmac
import json
import sys
import threading
import time

from azure.iot.device import (
    X509,
    IoTHubDeviceClient,
    Message,
    MethodResponse,
    ProvisioningDeviceClient,
)
from azure.iot.device.common.auth.sastoken import RenewableSasToken
from azure.iot.device.common.auth.signing_mechanism import SymmetricKeySigningMechanism


EMIT_LOCK = threading.Lock()


def emit(event, **fields):
    # The SDK calls back on its own threads: one whole line at a time, or two events
    # printed at once interleave into lines that are not JSON.
    line = json.dumps({"event": event, **fields}) + "\n"
    with EMIT_LOCK:
        sys.stdout.write(line)
        sys.stdout.flush()


def derive_device_key(group_key, registration_id):
    # As Azure's DPS documentation derives a group member's key.
    digest = hmac.HMAC(
        base64.b64decode(group_key), registration_id.encode("utf-8"), hashlib.sha256
    ).digest()
    return base64.b64encode(digest).decode("utf-8")


def main():
    config = json.loads(sys.argv[1])
    ca = open(config["ca"]).read()
    registration_id = config["registration_id"]
    # X.509: a certificate (CN = the registration id) and its key, files in PEM.
    x509 = None
    key = None
    if config.get("cert"):
        x509 = X509(cert_file=config["cert"], key_file=config["cert_key"])
    else:
        key = config.get("key") or derive_device_key(config["group_key"], registration_id)

    # The SDK's own SAS token, for the byte-for-byte comparison with ours.
    for resource in [
        "{}/registrations/{}".format(config["id_scope"], registration_id),
        "{}/devices/{}".format(config["hub"], registration_id),
    ]:
        if key is None:
            break
        token = RenewableSasToken(resource, SymmetricKeySigningMechanism(key), ttl=3600)
        emit("sas", resource=resource, key=key, expiry=token.expiry_time, token=str(token))

    if config.get("wrong_key"):
        bad = ProvisioningDeviceClient.create_from_symmetric_key(
            provisioning_host=config["dps"],
            registration_id=registration_id,
            id_scope=config["id_scope"],
            symmetric_key=base64.b64encode(b"not the enrollment key").decode(),
            server_verification_cert=ca,
        )
        try:
            bad.register()
            emit("wrong_key_registered")
        except Exception as err:  # the SDK's CredentialError or ConnectionFailedError
            emit("wrong_key_refused", error=type(err).__name__)
        return

    if x509 is not None:
        provisioning = ProvisioningDeviceClient.create_from_x509_certificate(
            provisioning_host=config["dps"],
            registration_id=registration_id,
            id_scope=config["id_scope"],
            x509=x509,
            server_verification_cert=ca,
        )
    else:
        provisioning = ProvisioningDeviceClient.create_from_symmetric_key(
            provisioning_host=config["dps"],
            registration_id=registration_id,
            id_scope=config["id_scope"],
            symmetric_key=key,
            server_verification_cert=ca,
        )
    provisioning.provisioning_payload = {"site": "referee"}
    result = provisioning.register()
    state = result.registration_state
    emit(
        "registered",
        status=result.status,
        assigned_hub=state.assigned_hub,
        device_id=state.device_id,
        substatus=state.sub_status,
        payload=state.response_payload,
    )
    if result.status != "assigned":
        sys.exit(1)

    if x509 is not None:
        client = IoTHubDeviceClient.create_from_x509_certificate(
            x509=x509,
            hostname=state.assigned_hub,
            device_id=state.device_id,
            server_verification_cert=ca,
        )
    else:
        client = IoTHubDeviceClient.create_from_symmetric_key(
            symmetric_key=key,
            hostname=state.assigned_hub,
            device_id=state.device_id,
            server_verification_cert=ca,
        )
    received = {"desired": threading.Event(), "method": threading.Event(), "c2d": threading.Event()}

    def on_desired(patch):
        emit("desired", patch=patch)
        received["desired"].set()

    def on_method(request):
        emit("method", name=request.name, payload=request.payload)
        client.send_method_response(
            MethodResponse.create_from_method_request(request, 200, {"rebooting": True})
        )
        received["method"].set()

    def on_message(message):
        emit(
            "c2d",
            data=message.data.decode("utf-8"),
            custom_properties=message.custom_properties,
            message_id=message.message_id,
        )
        received["c2d"].set()

    client.on_twin_desired_properties_patch_received = on_desired
    client.on_method_request_received = on_method
    client.on_message_received = on_message
    client.connect()
    emit("hub_connected")

    message = Message(json.dumps({"temperature": 21.5}))
    message.content_type = "application/json"
    message.content_encoding = "utf-8"
    message.custom_properties["source"] = "esp 1"
    message.message_id = "m-1"
    client.send_message(message)
    emit("sent")

    twin = client.get_twin()
    emit("twin", twin=twin)
    client.patch_twin_reported_properties({"firmware": {"version": "1.2.0"}, "ok": True})
    twin = client.get_twin()
    emit("twin_after_patch", twin=twin)

    emit("listening")
    deadline = time.monotonic() + 60
    for name, event in received.items():
        if not event.wait(max(0, deadline - time.monotonic())):
            emit("timeout", waiting_for=name)
            sys.exit(1)
    client.shutdown()
    emit("done")


if __name__ == "__main__":
    main()
