/*
 * The POSIX port (see posix_port.h): libcurl for HTTP(S), OpenSSL for SHA-256 and
 * base64, a directory as flash.
 */
#define _POSIX_C_SOURCE 200809L

#include "posix_port.h"

#include <curl/curl.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <openssl/evp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "outpost_agent_port.h"

/* The slots hold at most this much (an ESP32 app partition is usually 1.5-4 MiB). */
#define SLOT_CAPACITY (8u * 1024 * 1024)

static char flash_dir[512];
static char **boot_argv;
static outpost_posix_faults_t faults;
static const char *trusted_ca;
/* Whether the fault-injected cut already happened (it happens once). */
static bool cut_done;

/* The access points in range. */
typedef struct {
    char ssid[33];
    char passphrase[65];
} network_t;
static network_t networks[4];
static size_t network_count;

int outpost_posix_add_network(const char *ssid, const char *passphrase)
{
    if (network_count == sizeof networks / sizeof networks[0] || strlen(ssid) >= 33 ||
        strlen(passphrase) >= 65 || ssid[0] == '\0') {
        return -1;
    }
    snprintf(networks[network_count].ssid, sizeof networks[0].ssid, "%s", ssid);
    snprintf(networks[network_count].passphrase, sizeof networks[0].passphrase, "%s",
             passphrase);
    network_count++;
    return 0;
}

/* --- otadata: which slot boots and in what state ------------------------------------- */

typedef enum { STATE_VALID, STATE_NEW, STATE_PENDING } slot_state_t;

typedef struct {
    int boot;
    slot_state_t state;
    int rejected;
} otadata_t;

static void path_of(char *out, size_t cap, const char *name)
{
    snprintf(out, cap, "%s/%s", flash_dir, name);
}

/* The network the device is on now (a trial one until kept); an empty SSID: none. */
static network_t joined;

/* Reads the network kept in flash into `out`. */
static void wifi_load(network_t *out)
{
    memset(out, 0, sizeof *out);
    char path[600];
    path_of(path, sizeof path, "wifi");
    FILE *f = fopen(path, "r");
    if (f == NULL) {
        return;
    }
    char line[100];
    if (fgets(line, sizeof line, f) != NULL) {
        line[strcspn(line, "\n")] = '\0';
        snprintf(out->ssid, sizeof out->ssid, "%.32s", line);
    }
    if (fgets(line, sizeof line, f) != NULL) {
        line[strcspn(line, "\n")] = '\0';
        snprintf(out->passphrase, sizeof out->passphrase, "%.64s", line);
    }
    fclose(f);
}

/* Writes `len` bytes to `path` durably: a temporary file, fsync, rename. */
static int write_file(const char *path, const void *data, size_t len)
{
    char tmp[600];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    if (fd < 0) {
        return -1;
    }
    const uint8_t *p = data;
    size_t left = len;
    while (left > 0) {
        ssize_t n = write(fd, p, left);
        if (n < 0) {
            if (errno == EINTR) {
                continue;
            }
            close(fd);
            unlink(tmp);
            return -1;
        }
        p += n;
        left -= (size_t)n;
    }
    if (fsync(fd) != 0 || close(fd) != 0) {
        unlink(tmp);
        return -1;
    }
    return rename(tmp, path);
}

static int otadata_load(otadata_t *ota)
{
    char path[600];
    path_of(path, sizeof path, "otadata");
    FILE *f = fopen(path, "r");
    if (f == NULL) {
        return -1;
    }
    char state[16] = "";
    int n = fscanf(f, "boot=%d state=%15s rejected=%d", &ota->boot, state, &ota->rejected);
    fclose(f);
    if (n != 3 || (ota->boot != 0 && ota->boot != 1)) {
        return -1;
    }
    if (strcmp(state, "valid") == 0) {
        ota->state = STATE_VALID;
    } else if (strcmp(state, "new") == 0) {
        ota->state = STATE_NEW;
    } else if (strcmp(state, "pending") == 0) {
        ota->state = STATE_PENDING;
    } else {
        return -1;
    }
    return 0;
}

static int otadata_store(const otadata_t *ota)
{
    static const char *names[] = {"valid", "new", "pending"};
    char text[64];
    int n = snprintf(text, sizeof text, "boot=%d state=%s rejected=%d\n", ota->boot,
                     names[ota->state], ota->rejected);
    char path[600];
    path_of(path, sizeof path, "otadata");
    return write_file(path, text, (size_t)n);
}

static void slot_path(char *out, size_t cap, int slot)
{
    char name[16];
    snprintf(name, sizeof name, "slot%d.bin", slot);
    path_of(out, cap, name);
}

/* --- boot ------------------------------------------------------------------------------ */

static int copy_image(const char *from, int slot)
{
    FILE *in = fopen(from, "rb");
    if (in == NULL) {
        fprintf(stderr, "outpost-agent: cannot read %s: %s\n", from, strerror(errno));
        return -1;
    }
    uint8_t *image = malloc(SLOT_CAPACITY);
    size_t len = image ? fread(image, 1, SLOT_CAPACITY, in) : 0;
    fclose(in);
    char path[600];
    slot_path(path, sizeof path, slot);
    int rc = (image != NULL && len > 0 && len < SLOT_CAPACITY) ? write_file(path, image, len) : -1;
    free(image);
    if (rc != 0) {
        fprintf(stderr, "outpost-agent: %s is empty, too large or cannot be written\n", from);
    }
    return rc;
}

int outpost_posix_boot(const char *dir, const char *seed_image, char **argv,
                       const outpost_posix_faults_t *injected)
{
    if (strlen(dir) >= sizeof flash_dir - 32) {
        fprintf(stderr, "outpost-agent: the flash directory path is too long\n");
        return -1;
    }
    snprintf(flash_dir, sizeof flash_dir, "%s", dir);
    boot_argv = argv;
    if (injected != NULL) {
        faults = *injected;
    }
    char nvs[600];
    path_of(nvs, sizeof nvs, "nvs");
    if ((mkdir(dir, 0700) != 0 && errno != EEXIST) || (mkdir(nvs, 0700) != 0 && errno != EEXIST)) {
        fprintf(stderr, "outpost-agent: cannot make %s: %s\n", nvs, strerror(errno));
        return -1;
    }
    char wifi[600];
    path_of(wifi, sizeof wifi, "wifi");
    if (network_count > 0 && access(wifi, F_OK) != 0) {
        char text[100];
        int n = snprintf(text, sizeof text, "%s\n%s\n", networks[0].ssid, networks[0].passphrase);
        if (write_file(wifi, text, (size_t)n) != 0) {
            fprintf(stderr, "outpost-agent: cannot write %s\n", wifi);
            return -1;
        }
    }
    wifi_load(&joined);
    otadata_t ota;
    if (otadata_load(&ota) != 0) {
        if (seed_image == NULL) {
            fprintf(stderr, "outpost-agent: %s holds no image: give --image the first time\n",
                    dir);
            return -1;
        }
        if (copy_image(seed_image, 0) != 0) {
            return -1;
        }
        ota = (otadata_t){.boot = 0, .state = STATE_VALID, .rejected = 0};
        return otadata_store(&ota);
    }
    /* The bootloader's rule (CONFIG_BOOTLOADER_APP_ROLLBACK_ENABLE): a new image boots
     * once, pending; booting again while it is still pending means it never confirmed,
     * so it is rejected and the other slot boots. */
    if (ota.state == STATE_NEW) {
        ota.state = STATE_PENDING;
        return otadata_store(&ota);
    }
    if (ota.state == STATE_PENDING) {
        ota.boot = 1 - ota.boot;
        ota.state = STATE_VALID;
        ota.rejected = 1;
        return otadata_store(&ota);
    }
    return 0;
}

/* --- logging and time ------------------------------------------------------------------- */

void outpost_port_log(outpost_log_level_t level, const char *fmt, ...)
{
    static const char *names[] = {"error", "warn", "info"};
    fprintf(stderr, "outpost-agent %s: ", names[level]);
    va_list args;
    va_start(args, fmt);
    vfprintf(stderr, fmt, args);
    va_end(args);
    fputc('\n', stderr);
}

void outpost_port_event(const char *json)
{
    printf("%s\n", json);
    fflush(stdout);
}

uint64_t outpost_port_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

void outpost_port_sleep_ms(uint32_t ms)
{
    struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

/* --- NVS ------------------------------------------------------------------------------- */

static int kv_path(char *out, size_t cap, const char *key)
{
    for (const char *p = key; *p != '\0'; p++) {
        if (!((*p >= 'a' && *p <= 'z') || *p == '_')) {
            return -1;
        }
    }
    char name[64];
    snprintf(name, sizeof name, "nvs/%.40s", key);
    path_of(out, cap, name);
    return 0;
}

int outpost_port_kv_get(const char *key, char *buf, size_t cap, size_t *len)
{
    char path[600];
    if (kv_path(path, sizeof path, key) != 0) {
        return -1;
    }
    FILE *f = fopen(path, "rb");
    if (f == NULL) {
        return errno == ENOENT ? 1 : -1;
    }
    size_t n = fread(buf, 1, cap, f);
    int more = fgetc(f);
    fclose(f);
    if (more != EOF) {
        return -1;
    }
    *len = n;
    return 0;
}

int outpost_port_kv_set(const char *key, const char *value, size_t len)
{
    char path[600];
    if (kv_path(path, sizeof path, key) != 0) {
        return -1;
    }
    return write_file(path, value, len);
}

int outpost_port_kv_erase(const char *key)
{
    char path[600];
    if (kv_path(path, sizeof path, key) != 0) {
        return -1;
    }
    return (unlink(path) == 0 || errno == ENOENT) ? 0 : -1;
}

/* --- HTTP (libcurl) ---------------------------------------------------------------------- */

void outpost_port_http_set_ca(const char *ca_pem)
{
    trusted_ca = ca_pem;
}

static bool network_down(void)
{
    if (faults.offline_new_image && outpost_port_image_state() == OUTPOST_IMAGE_PENDING) {
        return true;
    }
    if (network_count == 0) {
        return false; /* no simulated Wi-Fi: the host's network */
    }
    return joined.ssid[0] == '\0' || strcmp(joined.ssid, faults.unreachable_on) == 0;
}

int outpost_port_wifi_current(char ssid[33], char passphrase[65])
{
    memcpy(ssid, joined.ssid, 33);
    memcpy(passphrase, joined.passphrase, 65);
    return ssid[0] == '\0' ? -1 : 0;
}

int outpost_port_wifi_keep(void)
{
    char path[600];
    char text[100];
    path_of(path, sizeof path, "wifi");
    int n = snprintf(text, sizeof text, "%s\n%s\n", joined.ssid, joined.passphrase);
    return write_file(path, text, (size_t)n);
}

int outpost_port_wifi_join(const char *ssid, const char *passphrase, uint32_t timeout_ms,
                           char *why, size_t why_cap)
{
    (void)timeout_ms;
    /* Leaving the current network first, as the radio does. */
    memset(&joined, 0, sizeof joined);
    for (size_t i = 0; i < network_count; i++) {
        if (strcmp(networks[i].ssid, ssid) != 0) {
            continue;
        }
        if (strcmp(networks[i].passphrase, passphrase) != 0) {
            snprintf(why, why_cap, "wrong passphrase (4-way handshake failed)");
            return -1;
        }
        joined = networks[i];
        return 0;
    }
    snprintf(why, why_cap, "no such network in range");
    return -1;
}

/* A handle for `url`: http(s) only, no redirects, TLS trusting the handed-over CA only. */
static CURL *easy_for(const char *url)
{
    if (strncmp(url, "https://", 8) == 0 && trusted_ca == NULL) {
        outpost_port_log(OUTPOST_LOG_ERROR, "%s: https, but no CA was handed over", url);
        return NULL;
    }
    CURL *curl = curl_easy_init();
    if (curl == NULL) {
        return NULL;
    }
    curl_easy_setopt(curl, CURLOPT_URL, url);
    curl_easy_setopt(curl, CURLOPT_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(curl, CURLOPT_FOLLOWLOCATION, 0L);
    curl_easy_setopt(curl, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(curl, CURLOPT_CONNECTTIMEOUT_MS, 10000L);
    if (trusted_ca != NULL) {
        struct curl_blob blob = {
            .data = (void *)trusted_ca, .len = strlen(trusted_ca), .flags = CURL_BLOB_COPY};
        curl_easy_setopt(curl, CURLOPT_CAPATH, NULL);
        curl_easy_setopt(curl, CURLOPT_CAINFO, NULL);
        curl_easy_setopt(curl, CURLOPT_CAINFO_BLOB, &blob);
    }
    return curl;
}

typedef struct {
    char *buf;
    size_t cap;
    size_t len;
    bool overflow;
} body_t;

static size_t body_write(char *data, size_t size, size_t nmemb, void *ctx)
{
    body_t *body = ctx;
    size_t n = size * nmemb;
    if (n > body->cap - body->len) {
        body->overflow = true;
        return 0;
    }
    memcpy(body->buf + body->len, data, n);
    body->len += n;
    return n;
}

int outpost_port_http_json(const char *method, const char *url, const char *bearer,
                           const char *body, uint32_t timeout_ms, char *resp, size_t cap,
                           size_t *resp_len, int *status)
{
    if (network_down()) {
        outpost_port_log(OUTPOST_LOG_WARN, "%s %s: the network is down (injected)", method, url);
        return -1;
    }
    CURL *curl = easy_for(url);
    if (curl == NULL) {
        return -1;
    }
    struct curl_slist *headers = curl_slist_append(NULL, "Content-Type: application/json");
    /* No "Expect: 100-continue" round trip before a body. */
    headers = curl_slist_append(headers, "Expect:");
    char auth[200];
    if (bearer != NULL) {
        snprintf(auth, sizeof auth, "Authorization: Bearer %s", bearer);
        headers = curl_slist_append(headers, auth);
    }
    body_t answer = {.buf = resp, .cap = cap};
    curl_easy_setopt(curl, CURLOPT_HTTPHEADER, headers);
    curl_easy_setopt(curl, CURLOPT_TIMEOUT_MS, (long)timeout_ms);
    curl_easy_setopt(curl, CURLOPT_WRITEFUNCTION, body_write);
    curl_easy_setopt(curl, CURLOPT_WRITEDATA, &answer);
    if (strcmp(method, "GET") == 0) {
        curl_easy_setopt(curl, CURLOPT_HTTPGET, 1L);
    } else {
        curl_easy_setopt(curl, CURLOPT_CUSTOMREQUEST, method);
        curl_easy_setopt(curl, CURLOPT_POSTFIELDS, body != NULL ? body : "");
    }
    CURLcode rc = curl_easy_perform(curl);
    long code = 0;
    curl_easy_getinfo(curl, CURLINFO_RESPONSE_CODE, &code);
    curl_easy_cleanup(curl);
    curl_slist_free_all(headers);
    if (answer.overflow) {
        outpost_port_log(OUTPOST_LOG_ERROR, "%s %s: the response is larger than %zu bytes",
                         method, url, cap);
        return -1;
    }
    if (rc != CURLE_OK) {
        outpost_port_log(OUTPOST_LOG_WARN, "%s %s: %s", method, url, curl_easy_strerror(rc));
        return -1;
    }
    *status = (int)code;
    *resp_len = answer.len;
    return 0;
}

typedef struct {
    CURL *curl;
    outpost_http_head_t *head;
    outpost_sink_fn sink;
    void *ctx;
    /* Where this response's bytes start in the file, and how many came. */
    uint64_t offset;
    uint64_t delivered;
    bool stopped;
    bool cut;
} download_ctx_t;

static size_t download_header(char *data, size_t size, size_t nmemb, void *ctx)
{
    download_ctx_t *dl = ctx;
    size_t n = size * nmemb;
    char line[256];
    size_t len = n < sizeof line - 1 ? n : sizeof line - 1;
    memcpy(line, data, len);
    line[len] = '\0';
    if (strncmp(line, "HTTP/", 5) == 0) {
        /* A new response (after 100 Continue, say): forget the last one's headers. */
        dl->head->range_start = -1;
        dl->head->etag[0] = '\0';
    } else if (strncasecmp(line, "content-range:", 14) == 0) {
        unsigned long long start = 0;
        if (sscanf(line + 14, " bytes %llu-", &start) == 1) {
            dl->head->range_start = (int64_t)start;
        }
    } else if (strncasecmp(line, "etag:", 5) == 0) {
        char *open = strchr(line, '"');
        char *close = open ? strchr(open + 1, '"') : NULL;
        if (close != NULL && (size_t)(close - open - 1) < sizeof dl->head->etag) {
            memcpy(dl->head->etag, open + 1, (size_t)(close - open - 1));
            dl->head->etag[close - open - 1] = '\0';
        }
    }
    return n;
}

static size_t download_write(char *data, size_t size, size_t nmemb, void *ctx)
{
    download_ctx_t *dl = ctx;
    size_t n = size * nmemb;
    if (dl->delivered == 0) {
        long code = 0;
        curl_easy_getinfo(dl->curl, CURLINFO_RESPONSE_CODE, &code);
        dl->head->status = (int)code;
    }
    /* Injected faults: the connection drops after cut_after bytes (once), or a byte
     * arrives flipped. */
    if (faults.cut_after > 0 && !cut_done && dl->offset <= faults.cut_after &&
        dl->offset + dl->delivered + n > faults.cut_after) {
        size_t keep = (size_t)(faults.cut_after - dl->offset - dl->delivered);
        cut_done = true;
        dl->cut = true;
        if (keep > 0 && dl->sink(dl->ctx, dl->head, (const uint8_t *)data, keep) != 0) {
            dl->stopped = true;
        }
        dl->delivered += keep;
        return 0;
    }
    uint64_t at = dl->offset + dl->delivered;
    if (faults.corrupt_at > 0 && at <= faults.corrupt_at && faults.corrupt_at < at + n) {
        data[faults.corrupt_at - at] ^= 0x01;
    }
    dl->delivered += n;
    if (dl->sink(dl->ctx, dl->head, (const uint8_t *)data, n) != 0) {
        dl->stopped = true;
        return 0;
    }
    return n;
}

int outpost_port_http_download(const char *url, uint64_t first, uint64_t last,
                               const char *if_range, outpost_sink_fn sink, void *ctx,
                               outpost_http_head_t *head)
{
    memset(head, 0, sizeof *head);
    head->range_start = -1;
    if (network_down()) {
        return -1;
    }
    CURL *curl = easy_for(url);
    if (curl == NULL) {
        return -1;
    }
    download_ctx_t dl = {
        .curl = curl, .head = head, .sink = sink, .ctx = ctx, .offset = first};
    struct curl_slist *headers = NULL;
    char range[48];
    char condition[100];
    snprintf(range, sizeof range, "%" PRIu64 "-%" PRIu64, first, last);
    curl_easy_setopt(curl, CURLOPT_RANGE, range);
    if (if_range != NULL) {
        snprintf(condition, sizeof condition, "If-Range: \"%.64s\"", if_range);
        headers = curl_slist_append(headers, condition);
    }
    curl_easy_setopt(curl, CURLOPT_HTTPHEADER, headers);
    curl_easy_setopt(curl, CURLOPT_HEADERFUNCTION, download_header);
    curl_easy_setopt(curl, CURLOPT_HEADERDATA, &dl);
    curl_easy_setopt(curl, CURLOPT_WRITEFUNCTION, download_write);
    curl_easy_setopt(curl, CURLOPT_WRITEDATA, &dl);
    /* A transfer slower than 1 byte/s for 30 s is a dead peer. */
    curl_easy_setopt(curl, CURLOPT_LOW_SPEED_LIMIT, 1L);
    curl_easy_setopt(curl, CURLOPT_LOW_SPEED_TIME, 30L);
    CURLcode rc = curl_easy_perform(curl);
    long code = 0;
    curl_easy_getinfo(curl, CURLINFO_RESPONSE_CODE, &code);
    curl_easy_cleanup(curl);
    curl_slist_free_all(headers);
    if (dl.cut) {
        outpost_port_log(OUTPOST_LOG_WARN, "%s: connection cut after %" PRIu64 " bytes (injected)",
                         url, dl.delivered);
        return -1;
    }
    if (dl.stopped) {
        return 1;
    }
    if (rc != CURLE_OK) {
        outpost_port_log(OUTPOST_LOG_WARN, "%s: %s", url, curl_easy_strerror(rc));
        return -1;
    }
    head->status = (int)code;
    return 0;
}

/* --- SHA-256 and base64 (OpenSSL) --------------------------------------------------------- */

outpost_sha256_t *outpost_port_sha256_start(void)
{
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    if (ctx != NULL && EVP_DigestInit_ex(ctx, EVP_sha256(), NULL) != 1) {
        EVP_MD_CTX_free(ctx);
        ctx = NULL;
    }
    return (outpost_sha256_t *)ctx;
}

void outpost_port_sha256_update(outpost_sha256_t *sha, const uint8_t *data, size_t len)
{
    EVP_DigestUpdate((EVP_MD_CTX *)sha, data, len);
}

void outpost_port_sha256_finish(outpost_sha256_t *sha, uint8_t out[32])
{
    unsigned int len = 32;
    EVP_DigestFinal_ex((EVP_MD_CTX *)sha, out, &len);
    EVP_MD_CTX_free((EVP_MD_CTX *)sha);
}

void outpost_port_sha256_abort(outpost_sha256_t *sha)
{
    EVP_MD_CTX_free((EVP_MD_CTX *)sha);
}

int outpost_port_base64_decode(const char *in, size_t in_len, uint8_t *out, size_t cap)
{
    if (in_len % 4 != 0 || in_len / 4 * 3 > cap || in_len > INT32_MAX) {
        return -1;
    }
    if (in_len == 0) {
        return 0;
    }
    for (size_t i = 0; i < in_len; i++) {
        char c = in[i];
        /* '=' only as the padding at the end: "AB==" or "ABC=", never "AB=C". */
        bool padding = c == '=' && (i == in_len - 1 || (i == in_len - 2 && in[in_len - 1] == '='));
        bool ok = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
                  c == '+' || c == '/' || padding;
        if (!ok) {
            return -1;
        }
    }
    int n = EVP_DecodeBlock(out, (const unsigned char *)in, (int)in_len);
    if (n < 0) {
        return -1;
    }
    /* EVP_DecodeBlock counts the padding as zero bytes. */
    if (in[in_len - 1] == '=') {
        n--;
        if (in[in_len - 2] == '=') {
            n--;
        }
    }
    return n;
}

/* --- the running image and the slots -------------------------------------------------------- */

static const char *chip_name(unsigned id)
{
    switch (id) {
    case 0x0000: return "esp32";
    case 0x0002: return "esp32s2";
    case 0x0005: return "esp32c3";
    case 0x0009: return "esp32s3";
    case 0x000c: return "esp32c2";
    case 0x000d: return "esp32c6";
    case 0x0010: return "esp32h2";
    case 0x0012: return "esp32p4";
    default: return NULL;
    }
}

/* Reads an app image's header and esp_app_desc_t (the first 288 bytes). */
static int read_app_info(const char *path, outpost_app_info_t *info)
{
    uint8_t head[24 + 8 + 256];
    FILE *f = fopen(path, "rb");
    if (f == NULL) {
        return -1;
    }
    size_t n = fread(head, 1, sizeof head, f);
    fclose(f);
    const uint8_t *desc = head + 32;
    uint32_t magic = (uint32_t)desc[0] | (uint32_t)desc[1] << 8 | (uint32_t)desc[2] << 16 |
                     (uint32_t)desc[3] << 24;
    const char *chip = n == sizeof head ? chip_name((unsigned)head[12] | (unsigned)head[13] << 8)
                                        : NULL;
    if (n != sizeof head || head[0] != 0xE9 || magic != 0xABCD5432u || chip == NULL) {
        return -1;
    }
    memset(info, 0, sizeof *info);
    info->secure_version = (uint32_t)desc[4] | (uint32_t)desc[5] << 8 |
                           (uint32_t)desc[6] << 16 | (uint32_t)desc[7] << 24;
    memcpy(info->version, desc + 16, sizeof info->version - 1);
    memcpy(info->project, desc + 48, sizeof info->project - 1);
    snprintf(info->chip, sizeof info->chip, "%s", chip);
    return 0;
}

int outpost_port_app_info(outpost_app_info_t *info)
{
    otadata_t ota;
    char path[600];
    if (otadata_load(&ota) != 0) {
        return -1;
    }
    slot_path(path, sizeof path, ota.boot);
    if (read_app_info(path, info) != 0) {
        outpost_port_log(OUTPOST_LOG_ERROR, "%s is not an ESP app image", path);
        return -1;
    }
    return 0;
}

outpost_image_state_t outpost_port_image_state(void)
{
    otadata_t ota;
    return otadata_load(&ota) == 0 && ota.state == STATE_PENDING ? OUTPOST_IMAGE_PENDING
                                                                 : OUTPOST_IMAGE_VALID;
}

int outpost_port_image_confirm(void)
{
    otadata_t ota;
    if (otadata_load(&ota) != 0) {
        return -1;
    }
    if (ota.state == STATE_VALID) {
        return 0;
    }
    ota.state = STATE_VALID;
    return otadata_store(&ota);
}

int outpost_port_image_rollback(void)
{
    otadata_t ota;
    if (otadata_load(&ota) != 0) {
        return -1;
    }
    ota.boot = 1 - ota.boot;
    ota.state = STATE_VALID;
    ota.rejected = 1;
    if (otadata_store(&ota) != 0) {
        return -1;
    }
    outpost_port_reboot();
}

int outpost_port_running_slot(char label[17])
{
    otadata_t ota;
    if (otadata_load(&ota) != 0) {
        return -1;
    }
    snprintf(label, 17, "slot%d", ota.boot);
    return 0;
}

/* The slot number of "slot0"/"slot1"; -1 otherwise. */
static int slot_number(const char *label)
{
    if (strcmp(label, "slot0") == 0) {
        return 0;
    }
    return strcmp(label, "slot1") == 0 ? 1 : -1;
}

int outpost_port_slot_bootable(const char *label)
{
    int slot = slot_number(label);
    char path[600];
    outpost_app_info_t info;
    if (slot < 0) {
        return 0;
    }
    slot_path(path, sizeof path, slot);
    return read_app_info(path, &info) == 0;
}

int outpost_port_boot_slot(const char *label)
{
    otadata_t ota;
    int slot = slot_number(label);
    if (slot < 0 || !outpost_port_slot_bootable(label) || otadata_load(&ota) != 0) {
        return -1;
    }
    ota.boot = slot;
    ota.state = STATE_VALID;
    ota.rejected = 0;
    return otadata_store(&ota);
}

int outpost_port_image_last_rejected(void)
{
    otadata_t ota;
    return otadata_load(&ota) == 0 && ota.rejected;
}

struct outpost_ota {
    int fd;
    int slot;
    uint64_t size;
    uint64_t written;
    char path[640];
};

/* The slot finished last, to boot next. */
static int finished_slot = -1;

outpost_ota_t *outpost_port_ota_begin(uint64_t size)
{
    otadata_t ota;
    if (otadata_load(&ota) != 0) {
        return NULL;
    }
    if (size > SLOT_CAPACITY) {
        outpost_port_log(OUTPOST_LOG_ERROR, "an image of %" PRIu64 " bytes does not fit the %u-byte slot",
                         size, SLOT_CAPACITY);
        return NULL;
    }
    outpost_ota_t *handle = calloc(1, sizeof *handle);
    if (handle == NULL) {
        return NULL;
    }
    handle->slot = 1 - ota.boot;
    handle->size = size;
    char slot[600];
    slot_path(slot, sizeof slot, handle->slot);
    snprintf(handle->path, sizeof handle->path, "%s.part", slot);
    handle->fd = open(handle->path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    if (handle->fd < 0) {
        outpost_port_log(OUTPOST_LOG_ERROR, "cannot open %s: %s", handle->path, strerror(errno));
        free(handle);
        return NULL;
    }
    return handle;
}

int outpost_port_ota_write(outpost_ota_t *ota, const uint8_t *data, size_t len)
{
    if (len > ota->size - ota->written) {
        return -1;
    }
    while (len > 0) {
        ssize_t n = write(ota->fd, data, len);
        if (n < 0) {
            if (errno == EINTR) {
                continue;
            }
            return -1;
        }
        data += n;
        len -= (size_t)n;
        ota->written += (uint64_t)n;
    }
    return 0;
}

int outpost_port_ota_end(outpost_ota_t *ota)
{
    int rc = -1;
    int synced = fsync(ota->fd);
    int closed = close(ota->fd);
    ota->fd = -1;
    if (synced == 0 && closed == 0) {
        outpost_app_info_t info;
        /* As esp_ota_end does: an image the bootloader would not start is refused. */
        if (ota->written == ota->size && read_app_info(ota->path, &info) == 0) {
            char slot[600];
            slot_path(slot, sizeof slot, ota->slot);
            if (rename(ota->path, slot) == 0) {
                finished_slot = ota->slot;
                rc = 0;
            }
        } else {
            outpost_port_log(OUTPOST_LOG_ERROR, "%s is not a complete ESP app image", ota->path);
        }
    }
    if (rc != 0) {
        unlink(ota->path);
    }
    free(ota);
    return rc;
}

void outpost_port_ota_abort(outpost_ota_t *ota)
{
    if (ota == NULL) {
        return;
    }
    close(ota->fd);
    unlink(ota->path);
    free(ota);
}

int outpost_port_ota_set_boot(void)
{
    otadata_t ota;
    if (finished_slot < 0 || otadata_load(&ota) != 0) {
        return -1;
    }
    ota.boot = finished_slot;
    ota.state = STATE_NEW;
    ota.rejected = 0;
    return otadata_store(&ota);
}

void outpost_port_reboot(void)
{
    fflush(stdout);
    fflush(stderr);
    curl_global_cleanup();
    execv("/proc/self/exe", boot_argv);
    fprintf(stderr, "outpost-agent: cannot restart: %s\n", strerror(errno));
    _exit(70);
}
