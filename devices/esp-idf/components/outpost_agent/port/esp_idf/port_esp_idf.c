/*
 * The ESP-IDF port of the Outpost agent (ESP-IDF 5.1 or later): esp_http_client for
 * HTTP(S), esp_ota_ops for the slots, NVS namespace "outpost" for state, mbedTLS for
 * SHA-256 and base64, FreeRTOS for time.
 *
 * Rollback needs CONFIG_BOOTLOADER_APP_ROLLBACK_ENABLE (the example's sdkconfig.defaults
 * sets it): a new image then boots ESP_OTA_IMG_PENDING_VERIFY and the agent confirms it
 * once it reaches the gateway.
 */
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "esp_app_desc.h"
#include "esp_event.h"
#include "esp_http_client.h"
#include "esp_log.h"
#include "esp_netif.h"
#include "esp_ota_ops.h"
#include "esp_system.h"
#include "esp_timer.h"
#include "esp_wifi.h"
#include "freertos/FreeRTOS.h"
#include "freertos/event_groups.h"
#include "freertos/task.h"
#include "mbedtls/base64.h"
#include "mbedtls/sha256.h"
#include "nvs.h"
#include "outpost_agent_port.h"
#include "sdkconfig.h"

/* The core formats 64-bit numbers (offsets, command ids) and size_t: newlib's nano printf
 * has neither, and would put wrong numbers in paths and Range headers. */
#if defined(CONFIG_LIBC_NEWLIB_NANO_FORMAT) || defined(CONFIG_NEWLIB_NANO_FORMAT)
#error "the Outpost agent needs full printf: disable CONFIG_LIBC_NEWLIB_NANO_FORMAT (ESP32-C2 enables it by default)"
#endif

static const char *TAG = "outpost";

/* The HTTP client's receive and send buffers, and the chunk a download reads at once. */
#define HTTP_BUFFER 1024
#define CHUNK 1024

/* --- logging and time ------------------------------------------------------------------- */

void outpost_port_log(outpost_log_level_t level, const char *fmt, ...)
{
    char line[200];
    va_list args;
    va_start(args, fmt);
    vsnprintf(line, sizeof line, fmt, args);
    va_end(args);
    switch (level) {
    case OUTPOST_LOG_ERROR: ESP_LOGE(TAG, "%s", line); break;
    case OUTPOST_LOG_WARN: ESP_LOGW(TAG, "%s", line); break;
    default: ESP_LOGI(TAG, "%s", line); break;
    }
}

void outpost_port_event(const char *json)
{
    ESP_LOGI(TAG, "event %s", json);
}

uint64_t outpost_port_now_ms(void)
{
    return (uint64_t)esp_timer_get_time() / 1000u;
}

void outpost_port_sleep_ms(uint32_t ms)
{
    vTaskDelay(pdMS_TO_TICKS(ms));
}

/* --- NVS ------------------------------------------------------------------------------- */

int outpost_port_kv_get(const char *key, char *buf, size_t cap, size_t *len)
{
    nvs_handle_t nvs;
    esp_err_t err = nvs_open("outpost", NVS_READONLY, &nvs);
    if (err == ESP_ERR_NVS_NOT_FOUND) {
        return 1; /* the namespace does not exist before the first write */
    }
    if (err != ESP_OK) {
        return -1;
    }
    size_t size = cap;
    err = nvs_get_blob(nvs, key, cap > 0 ? buf : NULL, &size);
    nvs_close(nvs);
    if (err == ESP_ERR_NVS_NOT_FOUND) {
        return 1;
    }
    if (err != ESP_OK || (cap > 0 && size > cap)) {
        return -1;
    }
    *len = size;
    return 0;
}

static int kv_write(const char *key, const char *value, size_t len, bool erase)
{
    nvs_handle_t nvs;
    if (nvs_open("outpost", NVS_READWRITE, &nvs) != ESP_OK) {
        return -1;
    }
    esp_err_t err = erase ? nvs_erase_key(nvs, key) : nvs_set_blob(nvs, key, value, len);
    if (err == ESP_ERR_NVS_NOT_FOUND && erase) {
        err = ESP_OK;
    }
    if (err == ESP_OK) {
        err = nvs_commit(nvs);
    }
    nvs_close(nvs);
    return err == ESP_OK ? 0 : -1;
}

int outpost_port_kv_set(const char *key, const char *value, size_t len)
{
    return kv_write(key, value, len, false);
}

int outpost_port_kv_erase(const char *key)
{
    return kv_write(key, NULL, 0, true);
}

/* --- HTTP (esp_http_client) ---------------------------------------------------------------- */

static const char *trusted_ca;

void outpost_port_http_set_ca(const char *ca_pem)
{
    trusted_ca = ca_pem;
}

static esp_http_client_handle_t client_for(const char *url, esp_http_client_method_t method,
                                           uint32_t timeout_ms, http_event_handle_cb on_event,
                                           void *user_data)
{
    if (strncmp(url, "https://", 8) == 0 && trusted_ca == NULL) {
        ESP_LOGE(TAG, "%s: https, but no CA was handed over", url);
        return NULL;
    }
    esp_http_client_config_t config = {
        .url = url,
        .method = method,
        .timeout_ms = (int)timeout_ms,
        /* Only the handed-over site CA is trusted; nothing from a bundle. */
        .cert_pem = trusted_ca,
        .disable_auto_redirect = true,
        .buffer_size = HTTP_BUFFER,
        .buffer_size_tx = HTTP_BUFFER,
        .event_handler = on_event,
        .user_data = user_data,
    };
    return esp_http_client_init(&config);
}

int outpost_port_http_json(const char *method, const char *url, const char *bearer,
                           const char *body, uint32_t timeout_ms, char *resp, size_t cap,
                           size_t *resp_len, int *status)
{
    esp_http_client_method_t verb = strcmp(method, "GET") == 0 ? HTTP_METHOD_GET : HTTP_METHOD_POST;
    esp_http_client_handle_t client = client_for(url, verb, timeout_ms, NULL, NULL);
    if (client == NULL) {
        return -1;
    }
    char auth[160];
    esp_http_client_set_header(client, "Content-Type", "application/json");
    if (bearer != NULL) {
        snprintf(auth, sizeof auth, "Bearer %s", bearer);
        esp_http_client_set_header(client, "Authorization", auth);
    }
    int body_len = body != NULL ? (int)strlen(body) : 0;
    int rc = -1;
    if (esp_http_client_open(client, body_len) != ESP_OK) {
        ESP_LOGW(TAG, "%s %s: cannot connect", method, url);
        goto out;
    }
    if (body_len > 0 && esp_http_client_write(client, body, body_len) != body_len) {
        ESP_LOGW(TAG, "%s %s: the request was cut", method, url);
        goto out;
    }
    if (esp_http_client_fetch_headers(client) < 0) {
        ESP_LOGW(TAG, "%s %s: no response", method, url);
        goto out;
    }
    size_t len = 0;
    for (;;) {
        if (len == cap) {
            char probe;
            if (esp_http_client_read(client, &probe, 1) > 0) {
                ESP_LOGE(TAG, "%s %s: the response is larger than %u bytes", method, url,
                         (unsigned)cap);
                goto out;
            }
            break;
        }
        int n = esp_http_client_read(client, resp + len, (int)(cap - len));
        if (n < 0) {
            goto out;
        }
        if (n == 0) {
            break;
        }
        len += (size_t)n;
    }
    if (!esp_http_client_is_complete_data_received(client)) {
        ESP_LOGW(TAG, "%s %s: the response was cut", method, url);
        goto out;
    }
    *status = esp_http_client_get_status_code(client);
    *resp_len = len;
    rc = 0;
out:
    esp_http_client_close(client);
    esp_http_client_cleanup(client);
    return rc;
}

/* Collects Content-Range and ETag of a download response. */
static esp_err_t download_event(esp_http_client_event_t *event)
{
    outpost_http_head_t *head = event->user_data;
    if (event->event_id != HTTP_EVENT_ON_HEADER || head == NULL) {
        return ESP_OK;
    }
    if (strcasecmp(event->header_key, "Content-Range") == 0) {
        unsigned long long start = 0;
        if (sscanf(event->header_value, "bytes %llu-", &start) == 1) {
            head->range_start = (int64_t)start;
        }
    } else if (strcasecmp(event->header_key, "ETag") == 0) {
        const char *open = strchr(event->header_value, '"');
        const char *close = open ? strchr(open + 1, '"') : NULL;
        if (close != NULL && (size_t)(close - open - 1) < sizeof head->etag) {
            memcpy(head->etag, open + 1, (size_t)(close - open - 1));
            head->etag[close - open - 1] = '\0';
        }
    }
    return ESP_OK;
}

int outpost_port_http_download(const char *url, uint64_t first, uint64_t last,
                               const char *if_range, outpost_sink_fn sink, void *ctx,
                               outpost_http_head_t *head)
{
    memset(head, 0, sizeof *head);
    head->range_start = -1;
    esp_http_client_handle_t client = client_for(url, HTTP_METHOD_GET, 30000, download_event, head);
    if (client == NULL) {
        return -1;
    }
    char range[48];
    char condition[72];
    snprintf(range, sizeof range, "bytes=%" PRIu64 "-%" PRIu64, first, last);
    esp_http_client_set_header(client, "Range", range);
    if (if_range != NULL) {
        snprintf(condition, sizeof condition, "\"%.64s\"", if_range);
        esp_http_client_set_header(client, "If-Range", condition);
    }
    static uint8_t chunk[CHUNK];
    int rc = -1;
    if (esp_http_client_open(client, 0) != ESP_OK || esp_http_client_fetch_headers(client) < 0) {
        ESP_LOGW(TAG, "%s: no response", url);
        goto out;
    }
    head->status = esp_http_client_get_status_code(client);
    for (;;) {
        int n = esp_http_client_read(client, (char *)chunk, sizeof chunk);
        if (n < 0) {
            goto out; /* cut: the caller resumes */
        }
        if (n == 0) {
            break;
        }
        if (sink(ctx, head, chunk, (size_t)n) != 0) {
            rc = 1;
            goto out;
        }
    }
    rc = esp_http_client_is_complete_data_received(client) ? 0 : -1;
out:
    esp_http_client_close(client);
    esp_http_client_cleanup(client);
    return rc;
}

/* --- SHA-256 and base64 (mbedTLS) ------------------------------------------------------------ */

struct outpost_sha256 {
    mbedtls_sha256_context ctx;
};

outpost_sha256_t *outpost_port_sha256_start(void)
{
    outpost_sha256_t *sha = malloc(sizeof *sha);
    if (sha == NULL) {
        return NULL;
    }
    mbedtls_sha256_init(&sha->ctx);
    if (mbedtls_sha256_starts(&sha->ctx, 0) != 0) {
        mbedtls_sha256_free(&sha->ctx);
        free(sha);
        return NULL;
    }
    return sha;
}

void outpost_port_sha256_update(outpost_sha256_t *sha, const uint8_t *data, size_t len)
{
    mbedtls_sha256_update(&sha->ctx, data, len);
}

void outpost_port_sha256_finish(outpost_sha256_t *sha, uint8_t out[32])
{
    mbedtls_sha256_finish(&sha->ctx, out);
    mbedtls_sha256_free(&sha->ctx);
    free(sha);
}

void outpost_port_sha256_abort(outpost_sha256_t *sha)
{
    if (sha != NULL) {
        mbedtls_sha256_free(&sha->ctx);
        free(sha);
    }
}

int outpost_port_base64_decode(const char *in, size_t in_len, uint8_t *out, size_t cap)
{
    size_t written = 0;
    if (in_len % 4 != 0) {
        return -1;
    }
    if (mbedtls_base64_decode(out, cap, &written, (const unsigned char *)in, in_len) != 0) {
        return -1;
    }
    return (int)written;
}

/* --- the running application and the OTA slots --------------------------------------------------- */

int outpost_port_app_info(outpost_app_info_t *info)
{
    const esp_app_desc_t *desc = esp_app_get_description();
    memset(info, 0, sizeof *info);
    snprintf(info->version, sizeof info->version, "%s", desc->version);
    snprintf(info->project, sizeof info->project, "%s", desc->project_name);
    snprintf(info->chip, sizeof info->chip, "%s", CONFIG_IDF_TARGET);
    info->secure_version = desc->secure_version;
    return 0;
}

outpost_image_state_t outpost_port_image_state(void)
{
    esp_ota_img_states_t state;
    const esp_partition_t *running = esp_ota_get_running_partition();
    if (esp_ota_get_state_partition(running, &state) == ESP_OK &&
        state == ESP_OTA_IMG_PENDING_VERIFY) {
        return OUTPOST_IMAGE_PENDING;
    }
    return OUTPOST_IMAGE_VALID;
}

int outpost_port_image_confirm(void)
{
    return esp_ota_mark_app_valid_cancel_rollback() == ESP_OK ? 0 : -1;
}

int outpost_port_image_rollback(void)
{
    /* Marks the running image invalid and restarts into the previous one (the last valid
     * OTA slot, or the factory app). Returns only when there is none. */
    esp_ota_mark_app_invalid_rollback_and_reboot();
    return -1;
}

int outpost_port_running_slot(char label[17])
{
    const esp_partition_t *running = esp_ota_get_running_partition();
    if (running == NULL) {
        return -1;
    }
    snprintf(label, 17, "%s", running->label);
    return 0;
}

static const esp_partition_t *app_slot(const char *label)
{
    return esp_partition_find_first(ESP_PARTITION_TYPE_APP, ESP_PARTITION_SUBTYPE_ANY, label);
}

int outpost_port_slot_bootable(const char *label)
{
    const esp_partition_t *slot = app_slot(label);
    esp_app_desc_t desc;
    esp_ota_img_states_t state;
    if (slot == NULL || esp_ota_get_partition_description(slot, &desc) != ESP_OK) {
        return 0;
    }
    /* The factory app has no OTA state; an OTA slot must not be marked invalid. */
    if (esp_ota_get_state_partition(slot, &state) == ESP_OK &&
        (state == ESP_OTA_IMG_INVALID || state == ESP_OTA_IMG_ABORTED)) {
        return 0;
    }
    return 1;
}

int outpost_port_boot_slot(const char *label)
{
    const esp_partition_t *slot = app_slot(label);
    /* esp_ota_set_boot_partition checks the image before it selects it. */
    return slot != NULL && esp_ota_set_boot_partition(slot) == ESP_OK ? 0 : -1;
}

int outpost_port_image_last_rejected(void)
{
    return esp_ota_get_last_invalid_partition() != NULL;
}

struct outpost_ota {
    esp_ota_handle_t handle;
    const esp_partition_t *partition;
};

static const esp_partition_t *finished;

outpost_ota_t *outpost_port_ota_begin(uint64_t size)
{
    const esp_partition_t *partition = esp_ota_get_next_update_partition(NULL);
    if (partition == NULL) {
        ESP_LOGE(TAG, "no OTA slot to write to (the partition table needs two)");
        return NULL;
    }
    if (size > partition->size) {
        ESP_LOGE(TAG, "an image of %" PRIu64 " bytes does not fit %s (%" PRIu32 " bytes)", size,
                 partition->label, partition->size);
        return NULL;
    }
    outpost_ota_t *ota = malloc(sizeof *ota);
    if (ota == NULL) {
        return NULL;
    }
    ota->partition = partition;
    if (esp_ota_begin(partition, (size_t)size, &ota->handle) != ESP_OK) {
        ESP_LOGE(TAG, "esp_ota_begin on %s failed", partition->label);
        free(ota);
        return NULL;
    }
    return ota;
}

int outpost_port_ota_write(outpost_ota_t *ota, const uint8_t *data, size_t len)
{
    return esp_ota_write(ota->handle, data, len) == ESP_OK ? 0 : -1;
}

int outpost_port_ota_end(outpost_ota_t *ota)
{
    /* esp_ota_end checks the image: magic, segments, its own hash, the chip. */
    esp_err_t err = esp_ota_end(ota->handle);
    if (err == ESP_OK) {
        finished = ota->partition;
    } else {
        ESP_LOGE(TAG, "esp_ota_end: %s", esp_err_to_name(err));
    }
    free(ota);
    return err == ESP_OK ? 0 : -1;
}

void outpost_port_ota_abort(outpost_ota_t *ota)
{
    if (ota != NULL) {
        esp_ota_abort(ota->handle);
        free(ota);
    }
}

int outpost_port_ota_set_boot(void)
{
    return finished != NULL && esp_ota_set_boot_partition(finished) == ESP_OK ? 0 : -1;
}

/* --- Wi-Fi (esp_wifi) ------------------------------------------------------------------------ */

int outpost_port_wifi_current(char ssid[33], char passphrase[65])
{
    wifi_config_t config;
    if (esp_wifi_get_config(WIFI_IF_STA, &config) != ESP_OK) {
        return -1;
    }
    /* Neither field needs a terminating NUL in wifi_config_t. */
    memcpy(ssid, config.sta.ssid, 32);
    ssid[32] = '\0';
    memcpy(passphrase, config.sta.password, 64);
    passphrase[64] = '\0';
    return ssid[0] != '\0' ? 0 : -1;
}

#define JOIN_GOT_IP BIT0
#define JOIN_FAILED BIT1

typedef struct {
    EventGroupHandle_t events;
    char ssid[33];
    uint8_t reason;
} join_t;

static void on_join_event(void *arg, esp_event_base_t base, int32_t id, void *data)
{
    join_t *join = arg;
    if (base == IP_EVENT && id == IP_EVENT_STA_GOT_IP) {
        xEventGroupSetBits(join->events, JOIN_GOT_IP);
    } else if (base == WIFI_EVENT && id == WIFI_EVENT_STA_DISCONNECTED) {
        const wifi_event_sta_disconnected_t *event = data;
        /* Only the new network's failures count: leaving the old one is expected. */
        size_t len = event->ssid_len < 32 ? event->ssid_len : 32;
        if (len == strlen(join->ssid) && memcmp(event->ssid, join->ssid, len) == 0) {
            join->reason = event->reason;
            xEventGroupSetBits(join->events, JOIN_FAILED);
        }
    }
}

int outpost_port_wifi_join(const char *ssid, const char *passphrase, uint32_t timeout_ms,
                           char *why, size_t why_cap)
{
    join_t join = {.events = xEventGroupCreate()};
    if (join.events == NULL) {
        snprintf(why, why_cap, "out of memory");
        return -1;
    }
    snprintf(join.ssid, sizeof join.ssid, "%s", ssid);
    wifi_config_t config = {0};
    memcpy(config.sta.ssid, ssid, strnlen(ssid, sizeof config.sta.ssid));
    memcpy(config.sta.password, passphrase, strnlen(passphrase, sizeof config.sta.password));
    config.sta.threshold.authmode = WIFI_AUTH_WPA2_PSK;
    esp_event_handler_instance_t on_ip = NULL;
    esp_event_handler_instance_t on_wifi = NULL;
    esp_event_handler_instance_register(IP_EVENT, IP_EVENT_STA_GOT_IP, on_join_event, &join,
                                        &on_ip);
    esp_event_handler_instance_register(WIFI_EVENT, WIFI_EVENT_STA_DISCONNECTED, on_join_event,
                                        &join, &on_wifi);
    esp_wifi_disconnect();
    /* A trial: kept in RAM only, so a power cut now brings the device back to the network
     * in flash (outpost_port_wifi_keep stores the new one once it is known to work). */
    esp_err_t err = esp_wifi_set_storage(WIFI_STORAGE_RAM);
    if (err == ESP_OK) {
        err = esp_wifi_set_config(WIFI_IF_STA, &config);
    }
    if (err == ESP_OK) {
        err = esp_wifi_connect();
    }
    EventBits_t bits = 0;
    if (err == ESP_OK) {
        bits = xEventGroupWaitBits(join.events, JOIN_GOT_IP | JOIN_FAILED, pdTRUE, pdFALSE,
                                   pdMS_TO_TICKS(timeout_ms));
    }
    esp_event_handler_instance_unregister(IP_EVENT, IP_EVENT_STA_GOT_IP, on_ip);
    esp_event_handler_instance_unregister(WIFI_EVENT, WIFI_EVENT_STA_DISCONNECTED, on_wifi);
    vEventGroupDelete(join.events);
    if (bits & JOIN_GOT_IP) {
        return 0;
    }
    if (err != ESP_OK) {
        snprintf(why, why_cap, "esp_wifi: %s", esp_err_to_name(err));
    } else if (!(bits & JOIN_FAILED)) {
        snprintf(why, why_cap, "no address within %" PRIu32 " s", timeout_ms / 1000);
    } else if (join.reason == WIFI_REASON_4WAY_HANDSHAKE_TIMEOUT ||
               join.reason == WIFI_REASON_AUTH_FAIL ||
               join.reason == WIFI_REASON_HANDSHAKE_TIMEOUT) {
        snprintf(why, why_cap, "wrong passphrase (4-way handshake failed)");
    } else if (join.reason == WIFI_REASON_NO_AP_FOUND) {
        snprintf(why, why_cap, "no such network in range");
    } else {
        snprintf(why, why_cap, "disconnected (reason %u)", (unsigned)join.reason);
    }
    return -1;
}

int outpost_port_wifi_keep(void)
{
    wifi_config_t config;
    if (esp_wifi_get_config(WIFI_IF_STA, &config) != ESP_OK ||
        esp_wifi_set_storage(WIFI_STORAGE_FLASH) != ESP_OK) {
        return -1;
    }
    /* Written again with flash storage on: the driver keeps it in NVS. */
    return esp_wifi_set_config(WIFI_IF_STA, &config) == ESP_OK ? 0 : -1;
}

void outpost_port_reboot(void)
{
    esp_restart();
}
