/*
 * The port interface: what the portable core of the Outpost agent needs from the
 * board. One implementation per platform, linked with the core:
 *   port/esp_idf/ - esp_http_client, esp_ota_ops, nvs, mbedTLS, FreeRTOS;
 *   port/posix/   - libcurl, files as flash and NVS, OpenSSL (the Linux test build).
 * Every function is called from the agent's one task; none needs to be reentrant.
 */
#ifndef OUTPOST_AGENT_PORT_H
#define OUTPOST_AGENT_PORT_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* --- logging and time ------------------------------------------------------------- */

typedef enum { OUTPOST_LOG_ERROR, OUTPOST_LOG_WARN, OUTPOST_LOG_INFO } outpost_log_level_t;

/** One log line (printf format). */
void outpost_port_log(outpost_log_level_t level, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;

/**
 * An event for whoever watches the device (the POSIX port prints one JSON line; the
 * ESP-IDF port logs it). `json` is a complete JSON object.
 */
void outpost_port_event(const char *json);

/** Milliseconds from an arbitrary start, monotonic. */
uint64_t outpost_port_now_ms(void);

/** Sleeps `ms` milliseconds. */
void outpost_port_sleep_ms(uint32_t ms);

/* --- key-value storage (NVS) ------------------------------------------------------ */

/**
 * Reads `key` into `buf` (at most `cap` bytes); sets `*len`. Returns 0, 1 when the key
 * is absent, or -1 on an error or when the value does not fit.
 */
int outpost_port_kv_get(const char *key, char *buf, size_t cap, size_t *len);

/** Stores `len` bytes under `key`, durably. Returns 0 or -1. */
int outpost_port_kv_set(const char *key, const char *value, size_t len);

/** Removes `key` (absent is fine). Returns 0 or -1. */
int outpost_port_kv_erase(const char *key);

/* --- HTTP ------------------------------------------------------------------------- */

/**
 * Trust only this CA (PEM) for https:// URLs from now on; NULL trusts none (https
 * calls then fail). The string stays valid until the next call.
 */
void outpost_port_http_set_ca(const char *ca_pem);

/**
 * One request with a JSON body (`body` may be NULL for none), bearer token `bearer`
 * (NULL for none). The response body goes to `resp` (at most `cap` bytes; a longer
 * one is an error). Returns 0 with `*status` and `*resp_len` set, or -1 when no
 * response came (connection, TLS, timeout) or it was too large.
 */
int outpost_port_http_json(const char *method, const char *url, const char *bearer,
                           const char *body, uint32_t timeout_ms, char *resp, size_t cap,
                           size_t *resp_len, int *status);

/** What the port learned of a download response before its first body byte. */
typedef struct {
    /** The HTTP status (200, 206, …). */
    int status;
    /** For 206: the first byte of Content-Range; -1 when absent. */
    int64_t range_start;
    /** The ETag, without quotes (empty when absent). */
    char etag[72];
} outpost_http_head_t;

/**
 * Receives body bytes. `head` is filled before the first call. Returns 0 to go on,
 * non-zero to stop the transfer.
 */
typedef int (*outpost_sink_fn)(void *ctx, const outpost_http_head_t *head, const uint8_t *data,
                               size_t len);

/**
 * GET bytes `first` to `last` (inclusive) of `url`: `Range: bytes=first-last`, with
 * `If-Range: "if_range"` when `if_range` is not NULL. Body bytes go to `sink`. Returns 0
 * when the response ended normally (`head` says how), 1 when the sink stopped it, -1 on
 * a connection error or a cut transfer.
 */
int outpost_port_http_download(const char *url, uint64_t first, uint64_t last,
                               const char *if_range, outpost_sink_fn sink, void *ctx,
                               outpost_http_head_t *head);

/* --- SHA-256 and base64 ------------------------------------------------------------ */

/** An opaque SHA-256 state. */
typedef struct outpost_sha256 outpost_sha256_t;

/** A new SHA-256 state, or NULL when out of memory. */
outpost_sha256_t *outpost_port_sha256_start(void);
void outpost_port_sha256_update(outpost_sha256_t *sha, const uint8_t *data, size_t len);
/** Writes the digest and frees the state. */
void outpost_port_sha256_finish(outpost_sha256_t *sha, uint8_t out[32]);
/** Frees the state without a digest. */
void outpost_port_sha256_abort(outpost_sha256_t *sha);

/**
 * Decodes standard base64 `in` (`in_len` characters, padding required) into `out`.
 * Returns the number of bytes, or -1 when it is not base64 or does not fit `cap`.
 */
int outpost_port_base64_decode(const char *in, size_t in_len, uint8_t *out, size_t cap);

/* --- the running application and the OTA slots ------------------------------------ */

/** What the running image says about itself (ESP-IDF: esp_app_desc_t and the target). */
typedef struct {
    char version[32];
    char project[32];
    /** ESP-IDF target name ("esp32c3"). */
    char chip[16];
    /** The anti-rollback counter (esp_app_desc_t.secure_version). */
    uint32_t secure_version;
} outpost_app_info_t;

/** Fills `info` for the running image. Returns 0 or -1. */
int outpost_port_app_info(outpost_app_info_t *info);

/** The running image's state: whether it still waits for confirmation. */
typedef enum {
    /** Confirmed (or rollback is not enabled): nothing to decide. */
    OUTPOST_IMAGE_VALID,
    /** First boot of a new image: confirm it or give it up. */
    OUTPOST_IMAGE_PENDING,
} outpost_image_state_t;

outpost_image_state_t outpost_port_image_state(void);

/** Marks the running image good (ESP-IDF: esp_ota_mark_app_valid_cancel_rollback). */
int outpost_port_image_confirm(void);

/**
 * Gives up the running pending image and boots the previous one
 * (esp_ota_mark_app_invalid_rollback_and_reboot). Returns only on failure (-1).
 */
int outpost_port_image_rollback(void);

/** The label of the slot the running image was booted from (at most 16 characters). */
int outpost_port_running_slot(char label[17]);

/** Whether slot `label` holds an image the bootloader would start: 1 or 0. */
int outpost_port_slot_bootable(const char *label);

/** Boots slot `label` next time (esp_ota_set_boot_partition). Returns 0 or -1. */
int outpost_port_boot_slot(const char *label);

/** Whether the last boot attempt of a new image failed and the previous one booted again. */
int outpost_port_image_last_rejected(void);

/** An update being written to the passive slot. */
typedef struct outpost_ota outpost_ota_t;

/**
 * Starts writing an image of `size` bytes to the passive slot (erasing it). NULL when
 * the image does not fit or the slot cannot be opened (the log says which).
 */
outpost_ota_t *outpost_port_ota_begin(uint64_t size);

/** Appends `len` bytes. Returns 0 or -1. */
int outpost_port_ota_write(outpost_ota_t *ota, const uint8_t *data, size_t len);

/**
 * Finishes writing and has the platform check the image (ESP-IDF: esp_ota_end).
 * Frees `ota`. Returns 0, or -1 when the image is not valid for this device.
 */
int outpost_port_ota_end(outpost_ota_t *ota);

/** Drops what was written. Frees `ota`. */
void outpost_port_ota_abort(outpost_ota_t *ota);

/** Boots the slot last finished with outpost_port_ota_end next time. Returns 0 or -1. */
int outpost_port_ota_set_boot(void);

/* --- Wi-Fi ------------------------------------------------------------------------- */

/**
 * The network the device is on: its SSID (at most 32 bytes) and passphrase (at most 64).
 * Returns 0 or -1.
 */
int outpost_port_wifi_current(char ssid[33], char passphrase[65]);

/**
 * Leaves the current network and joins `ssid` with `passphrase`, waiting at most
 * `timeout_ms` for an address. It is a trial: a restart still comes back to the network
 * last kept. Returns 0, or -1 with the reason in `why` (the device is then on no network:
 * join the old one again).
 */
int outpost_port_wifi_join(const char *ssid, const char *passphrase, uint32_t timeout_ms,
                           char *why, size_t why_cap);

/** Keeps the network joined last: the one the device comes back to after a restart. */
int outpost_port_wifi_keep(void);

/** Restarts the device. Does not return. */
void outpost_port_reboot(void)
#if defined(__GNUC__)
    __attribute__((noreturn))
#endif
    ;

#ifdef __cplusplus
}
#endif

#endif /* OUTPOST_AGENT_PORT_H */
