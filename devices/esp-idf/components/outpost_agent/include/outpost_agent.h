/*
 * The Outpost device agent: what an ESP device runs so that an Outpost gateway can
 * update it (docs/device-agent.md).
 *
 * The gateway hands the device a credential during onboarding (the `outpost-agent`
 * protocomm endpoint); the agent keeps it, registers with the gateway's device API,
 * long-polls for commands, downloads firmware from the signed links it is given (Range
 * resume, size and sha256 checked), writes it to the passive slot, reboots into it on
 * `ota-apply`, confirms it once the gateway is reached again, and boots the previous
 * image on `ota-rollback` or when the new one cannot reach the gateway.
 *
 * The core is portable C11; everything board-specific goes through the port interface
 * in outpost_agent_port.h (ESP-IDF and POSIX ports ship with it).
 */
#ifndef OUTPOST_AGENT_H
#define OUTPOST_AGENT_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/** The agent protocol this core speaks (announced in proto-ver as "outpost"). */
#define OUTPOST_AGENT_PROTOCOL_VERSION "1.0"

/** The protocomm endpoint the gateway writes the credential to. */
#define OUTPOST_AGENT_ENDPOINT "outpost-agent"

/** Largest message (credential, command, response body) the agent accepts, in bytes. */
#ifndef OUTPOST_AGENT_MAX_MESSAGE
#define OUTPOST_AGENT_MAX_MESSAGE 3072
#endif

/** Results of the agent's calls. */
typedef enum {
    OUTPOST_OK = 0,
    /** No credential stored yet: onboard the device first. */
    OUTPOST_ERR_NO_CREDENTIAL = -1,
    /** Input that is not what the protocol says (named in the log). */
    OUTPOST_ERR_INVALID = -2,
    /** A message above OUTPOST_AGENT_MAX_MESSAGE or nesting too deep. */
    OUTPOST_ERR_TOO_LARGE = -3,
    /** The gateway could not be reached or answered with an error status. */
    OUTPOST_ERR_NETWORK = -4,
    /** Flash, NVS or memory failed. */
    OUTPOST_ERR_STORAGE = -5,
    /** The gateway refused the credential (revoked): onboard the device again. */
    OUTPOST_ERR_REVOKED = -6,
} outpost_err_t;

/** A further property reported at registration (e.g. "manufacturer_code"). */
typedef struct {
    const char *key;
    const char *value;
} outpost_property_t;

/** What the application tells the agent about itself. */
typedef struct {
    /** Reported as `manufacturer` (e.g. "Espressif"). */
    const char *manufacturer;
    /** Reported as `model`: the device type the gateway's handler serves ("esp32-app"). */
    const char *model;
    /** Further properties; chip, project and secure_version are added by the agent. */
    const outpost_property_t *properties;
    size_t property_count;
    /** Long-poll wait in seconds (1-60; 0 means 20). */
    uint32_t poll_wait_s;
    /**
     * How long a new image may take to reach the gateway before the agent gives it up
     * and boots the previous one, in milliseconds (0 means 120000).
     */
    uint32_t confirm_timeout_ms;
    /**
     * Bytes fetched per download request (0 means 256 KiB): progress is reported between
     * segments, and a cut connection costs one segment at most.
     */
    uint32_t segment_bytes;
} outpost_agent_config_t;

/**
 * Takes the credential the gateway wrote to the `outpost-agent` endpoint
 * (`{"api", "deviceId", "token", "caPem"?}`), checks it and stores it in NVS.
 * Returns OUTPOST_OK, OUTPOST_ERR_INVALID (named in the log) or OUTPOST_ERR_TOO_LARGE.
 */
outpost_err_t outpost_agent_set_credential(const char *json, size_t len);

/**
 * The `outpost-agent` protocomm endpoint: takes the credential in `in` (as
 * outpost_agent_set_credential) and writes the answer the gateway reads into `out`:
 * `{"status":"ok"}`, or `{"status":"error","reason":"…"}`. Returns the answer's length
 * (0 when `cap` is too small; 160 bytes always suffice).
 */
size_t outpost_agent_endpoint(const uint8_t *in, size_t in_len, char *out, size_t cap);

/** Whether a credential is stored. */
int outpost_agent_has_credential(void);

/** Forgets the stored credential (the device is to be onboarded again). */
outpost_err_t outpost_agent_forget_credential(void);

/**
 * Runs the agent: confirms or gives up a new image, registers, then serves commands
 * until the credential is revoked (OUTPOST_ERR_REVOKED) or none is stored
 * (OUTPOST_ERR_NO_CREDENTIAL). Network errors are retried with backoff, never
 * returned. Reboots (through the port) on `ota-apply` and `ota-rollback`.
 */
outpost_err_t outpost_agent_run(const outpost_agent_config_t *config);

/** The most heap the agent itself held at once, in bytes (its own allocations and cJSON's). */
size_t outpost_agent_heap_peak(void);

/** Heap the agent holds now, in bytes. */
size_t outpost_agent_heap_now(void);

#ifdef __cplusplus
}
#endif

#endif /* OUTPOST_AGENT_H */
