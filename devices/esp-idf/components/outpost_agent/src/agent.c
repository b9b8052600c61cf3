/*
 * The portable core of the Outpost device agent: the protocol of docs/device-agent.md
 * and the update state machine. Everything board-specific is a port call
 * (outpost_agent_port.h).
 *
 * State kept across reboots, in NVS:
 *   "credential" - the JSON the gateway handed over at onboarding;
 *   "update"     - the update last applied: {"version", "from", "state", "reason"?},
 *                  state "applied" (reboot pending or report due), "reported", or
 *                  "rolled-back".
 */
#include "outpost_agent.h"

#include <inttypes.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cJSON.h"
#include "outpost_agent_port.h"

#define API_MAX 160
#define ID_MAX 64
#define TOKEN_MAX 128
#define CA_MAX 2400
#define URL_MAX 512
#define VERSION_MAX 32
#define REASON_MAX 160
/* The deepest JSON the agent reads: the credential and commands are flat objects. */
#define JSON_DEPTH_MAX 4
#define DOWNLOAD_ATTEMPTS 6

/* --- heap accounting ---------------------------------------------------------------- */

/* Every allocation of the core goes through here, so the agent can say what it costs
 * (docs/device-agent.md gives the figure). The size lives in front of the block, padded
 * to keep the block aligned for any type. The counters are atomic: the protocomm
 * endpoint runs on another task than the agent.
 *
 * cJSON's allocations are counted too only in a build that defines
 * OUTPOST_AGENT_COUNT_CJSON (the POSIX test build): that installs cJSON's global hooks,
 * which would break any other cJSON user in a firmware that frees cJSON's memory with
 * plain free(). */
typedef union {
    size_t size;
    max_align_t align;
} heap_header_t;

static atomic_size_t heap_now;
static atomic_size_t heap_peak;

static void *agent_malloc(size_t size)
{
    if (size > SIZE_MAX - sizeof(heap_header_t)) {
        return NULL;
    }
    heap_header_t *block = malloc(sizeof(heap_header_t) + size);
    if (block == NULL) {
        return NULL;
    }
    block->size = size;
    size_t now = atomic_fetch_add(&heap_now, size) + size;
    size_t peak = atomic_load(&heap_peak);
    while (now > peak && !atomic_compare_exchange_weak(&heap_peak, &peak, now)) {
    }
    return block + 1;
}

static void agent_free(void *ptr)
{
    if (ptr == NULL) {
        return;
    }
    heap_header_t *block = (heap_header_t *)ptr - 1;
    atomic_fetch_sub(&heap_now, block->size);
    free(block);
}

size_t outpost_agent_heap_peak(void)
{
    return atomic_load(&heap_peak);
}

size_t outpost_agent_heap_now(void)
{
    return atomic_load(&heap_now);
}

static void use_agent_heap(void)
{
#ifdef OUTPOST_AGENT_COUNT_CJSON
    static atomic_bool done;
    if (!atomic_exchange(&done, true)) {
        cJSON_Hooks hooks = {.malloc_fn = agent_malloc, .free_fn = agent_free};
        cJSON_InitHooks(&hooks);
    }
#endif
}

/* --- small helpers -------------------------------------------------------------------- */

#define LOG_E(...) outpost_port_log(OUTPOST_LOG_ERROR, __VA_ARGS__)
#define LOG_W(...) outpost_port_log(OUTPOST_LOG_WARN, __VA_ARGS__)
#define LOG_I(...) outpost_port_log(OUTPOST_LOG_INFO, __VA_ARGS__)

/* Copies a NUL-terminated string into a fixed buffer; false when it does not fit. */
static bool copy_string(char *dst, size_t cap, const char *src)
{
    size_t len = strlen(src);
    if (len >= cap) {
        return false;
    }
    memcpy(dst, src, len + 1);
    return true;
}

/* How deeply `text` nests objects and arrays (strings skipped); SIZE_MAX when a string
 * is not closed. cJSON would follow up to 1000 levels: the agent refuses more than a
 * few before parsing. */
static size_t json_depth(const char *text, size_t len)
{
    size_t depth = 0;
    size_t max = 0;
    bool in_string = false;
    for (size_t i = 0; i < len; i++) {
        char c = text[i];
        if (in_string) {
            if (c == '\\') {
                i++;
            } else if (c == '"') {
                in_string = false;
            }
        } else if (c == '"') {
            in_string = true;
        } else if (c == '{' || c == '[') {
            depth++;
            if (depth > max) {
                max = depth;
            }
        } else if ((c == '}' || c == ']') && depth > 0) {
            depth--;
        }
    }
    return in_string ? SIZE_MAX : max;
}

/* Parses a bounded JSON object; NULL (with the reason logged) otherwise. */
static cJSON *parse_object(const char *what, const char *text, size_t len)
{
    if (len > OUTPOST_AGENT_MAX_MESSAGE) {
        LOG_E("%s: %zu bytes, above the %d the agent accepts", what, len,
              OUTPOST_AGENT_MAX_MESSAGE);
        return NULL;
    }
    if (json_depth(text, len) > JSON_DEPTH_MAX) {
        LOG_E("%s: nested deeper than %d levels", what, JSON_DEPTH_MAX);
        return NULL;
    }
    cJSON *json = cJSON_ParseWithLength(text, len);
    if (json == NULL || !cJSON_IsObject(json)) {
        LOG_E("%s: not a JSON object", what);
        cJSON_Delete(json);
        return NULL;
    }
    return json;
}

/* Overwrites a secret; through a volatile pointer, so the compiler cannot drop it as a
 * dead store. */
static void wipe(void *secret, size_t len)
{
    volatile unsigned char *p = secret;
    while (len-- > 0) {
        *p++ = 0;
    }
}

/* Whether `value` is a whole number from 0 to `max`. */
static bool whole_number(double value, double max)
{
    return value >= 0 && value <= max && value == (double)(uint64_t)value;
}

static const char *string_field(const cJSON *object, const char *name)
{
    const cJSON *item = cJSON_GetObjectItemCaseSensitive(object, name);
    return cJSON_IsString(item) ? item->valuestring : NULL;
}

/* Writes `text` as a JSON string body into `out` (for events). */
static void json_quote(char *out, size_t cap, const char *text)
{
    size_t n = 0;
    if (cap < 3) {
        if (cap > 0) {
            out[0] = '\0';
        }
        return;
    }
    out[n++] = '"';
    for (const char *p = text; *p != '\0' && n + 7 < cap; p++) {
        unsigned char c = (unsigned char)*p;
        if (c == '"' || c == '\\') {
            out[n++] = '\\';
            out[n++] = (char)c;
        } else if (c < 0x20) {
            n += (size_t)snprintf(out + n, cap - n, "\\u%04x", c);
        } else {
            out[n++] = (char)c;
        }
    }
    out[n++] = '"';
    out[n] = '\0';
}

static void event2(const char *name, const char *key, const char *value)
{
    char quoted[REASON_MAX * 2];
    char line[REASON_MAX * 2 + 64];
    json_quote(quoted, sizeof quoted, value);
    snprintf(line, sizeof line, "{\"event\":\"%s\",\"%s\":%s}", name, key, quoted);
    outpost_port_event(line);
}

/* --- the credential ------------------------------------------------------------------- */

typedef struct {
    char api[API_MAX];
    char device_id[ID_MAX];
    char token[TOKEN_MAX];
    /* The site CA (PEM), or NULL for a plain http:// API. On the agent's heap. */
    char *ca_pem;
} credential_t;

static bool id_char(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
           c == '-' || c == '_' || c == '.';
}

static bool token_char(char c)
{
    return c > 0x20 && c < 0x7f;
}

/* Checks and copies the credential JSON; `why` gets the reason when it is refused. */
static outpost_err_t credential_parse(const char *json, size_t len, credential_t *out,
                                      const char **why)
{
    memset(out, 0, sizeof *out);
    if (len > OUTPOST_AGENT_MAX_MESSAGE) {
        *why = "the credential is too large";
        return OUTPOST_ERR_TOO_LARGE;
    }
    cJSON *root = parse_object("credential", json, len);
    if (root == NULL) {
        *why = "the credential is not a JSON object";
        return OUTPOST_ERR_INVALID;
    }
    outpost_err_t err = OUTPOST_ERR_INVALID;
    const char *api = string_field(root, "api");
    const char *id = string_field(root, "deviceId");
    const char *token = string_field(root, "token");
    const cJSON *ca = cJSON_GetObjectItemCaseSensitive(root, "caPem");
    if (api == NULL || id == NULL || token == NULL) {
        *why = "the credential lacks api, deviceId or token";
        goto done;
    }
    if (strncmp(api, "http://", 7) != 0 && strncmp(api, "https://", 8) != 0) {
        *why = "the credential's api is not an http(s) URL";
        goto done;
    }
    if (!copy_string(out->api, sizeof out->api, api) ||
        !copy_string(out->device_id, sizeof out->device_id, id) ||
        !copy_string(out->token, sizeof out->token, token)) {
        *why = "a credential field is too long";
        goto done;
    }
    size_t api_len = strlen(out->api);
    while (api_len > 0 && out->api[api_len - 1] == '/') {
        out->api[--api_len] = '\0';
    }
    if (out->device_id[0] == '\0' || out->token[0] == '\0') {
        *why = "the credential's deviceId or token is empty";
        goto done;
    }
    if (out->device_id[0] == '.') {
        *why = "the credential's deviceId starts with a dot (a URL path segment)";
        goto done;
    }
    for (const char *p = out->device_id; *p != '\0'; p++) {
        if (!id_char(*p)) {
            *why = "the credential's deviceId has characters a URL path cannot carry";
            goto done;
        }
    }
    for (const char *p = out->token; *p != '\0'; p++) {
        if (!token_char(*p)) {
            *why = "the credential's token has characters a header cannot carry";
            goto done;
        }
    }
    if (ca != NULL && !cJSON_IsNull(ca)) {
        if (!cJSON_IsString(ca) || strstr(ca->valuestring, "-----BEGIN CERTIFICATE-----") == NULL) {
            *why = "the credential's caPem is not a PEM certificate";
            goto done;
        }
        size_t ca_len = strlen(ca->valuestring);
        if (ca_len >= CA_MAX) {
            *why = "the credential's caPem is too long";
            goto done;
        }
        out->ca_pem = agent_malloc(ca_len + 1);
        if (out->ca_pem == NULL) {
            *why = "out of memory";
            err = OUTPOST_ERR_STORAGE;
            goto done;
        }
        memcpy(out->ca_pem, ca->valuestring, ca_len + 1);
    } else if (strncmp(out->api, "https://", 8) == 0) {
        *why = "an https api needs the caPem to trust";
        goto done;
    }
    err = OUTPOST_OK;
done:
    cJSON_Delete(root);
    return err;
}

static void credential_free(credential_t *credential)
{
    agent_free(credential->ca_pem);
    credential->ca_pem = NULL;
}

static outpost_err_t set_credential(const char *json, size_t len, const char **why)
{
    use_agent_heap();
    credential_t parsed;
    *why = "";
    outpost_err_t err = credential_parse(json, len, &parsed, why);
    if (err != OUTPOST_OK) {
        LOG_E("credential refused: %s", *why);
        event2("credential_refused", "reason", *why);
        return err;
    }
    credential_free(&parsed);
    if (outpost_port_kv_set("credential", json, len) != 0) {
        *why = "the credential cannot be stored";
        LOG_E("%s", *why);
        return OUTPOST_ERR_STORAGE;
    }
    event2("credential", "device", parsed.device_id);
    return OUTPOST_OK;
}

outpost_err_t outpost_agent_set_credential(const char *json, size_t len)
{
    const char *why = NULL;
    return set_credential(json, len, &why);
}

/* A credential coming in chunks ({"chunk": i, "of": n, "base64": …}: a BLE write holds at
 * most 512 bytes, less than a credential with the site CA). One handover at a time. */
static struct {
    char *text;
    size_t len;
    int next;
    int of;
} assembly;

static void assembly_reset(void)
{
    agent_free(assembly.text);
    memset(&assembly, 0, sizeof assembly);
}

/* Takes one chunk. Returns NULL when more are expected (`*done` false), or with `*done`
 * the reason it is refused; on the last chunk `*done` is set and the reason is NULL. */
static const char *assembly_add(const cJSON *message, bool *done)
{
    const cJSON *chunk = cJSON_GetObjectItemCaseSensitive(message, "chunk");
    const cJSON *of = cJSON_GetObjectItemCaseSensitive(message, "of");
    const char *part = string_field(message, "base64");
    *done = true;
    if (!cJSON_IsNumber(chunk) || !cJSON_IsNumber(of) || part == NULL ||
        !whole_number(chunk->valuedouble, 15) || !whole_number(of->valuedouble, 16) ||
        chunk->valuedouble >= of->valuedouble) {
        assembly_reset();
        return "a credential chunk without chunk, of (at most 16) or base64";
    }
    int i = (int)chunk->valuedouble;
    int n = (int)of->valuedouble;
    if (i == 0) {
        assembly_reset();
        assembly.text = agent_malloc(OUTPOST_AGENT_MAX_MESSAGE + 1);
        if (assembly.text == NULL) {
            return "out of memory";
        }
        assembly.of = n;
    }
    if (assembly.text == NULL || i != assembly.next || n != assembly.of) {
        assembly_reset();
        return "a credential chunk out of order";
    }
    size_t part_len = strlen(part);
    if (part_len / 4 * 3 > OUTPOST_AGENT_MAX_MESSAGE - assembly.len) {
        assembly_reset();
        return "the credential is too large";
    }
    int decoded = outpost_port_base64_decode(part, part_len, (uint8_t *)assembly.text + assembly.len,
                                             OUTPOST_AGENT_MAX_MESSAGE - assembly.len);
    if (decoded < 0) {
        assembly_reset();
        return "a credential chunk that is not base64";
    }
    assembly.len += (size_t)decoded;
    assembly.next++;
    *done = assembly.next == assembly.of;
    return NULL;
}

size_t outpost_agent_endpoint(const uint8_t *in, size_t in_len, char *out, size_t cap)
{
    use_agent_heap();
    const char *why = NULL;
    outpost_err_t err = OUTPOST_ERR_INVALID;
    bool more = false;
    /* A chunk is a small object with "chunk"; anything else is a whole credential. */
    cJSON *message = in_len <= 1024 ? cJSON_ParseWithLength((const char *)in, in_len) : NULL;
    if (message != NULL && cJSON_IsObject(message) &&
        cJSON_GetObjectItemCaseSensitive(message, "chunk") != NULL) {
        bool done = false;
        why = assembly_add(message, &done);
        if (why == NULL && done) {
            err = set_credential(assembly.text, assembly.len, &why);
            assembly_reset();
        } else if (why == NULL) {
            more = true;
        } else {
            LOG_E("credential refused: %s", why);
        }
    } else {
        assembly_reset();
        err = set_credential((const char *)in, in_len, &why);
    }
    cJSON_Delete(message);
    int n;
    if (more) {
        n = snprintf(out, cap, "{\"status\":\"more\"}");
    } else if (err == OUTPOST_OK) {
        n = snprintf(out, cap, "{\"status\":\"ok\"}");
    } else {
        char quoted[REASON_MAX];
        json_quote(quoted, sizeof quoted, why != NULL ? why : "refused");
        n = snprintf(out, cap, "{\"status\":\"error\",\"reason\":%s}", quoted);
    }
    return (n < 0 || (size_t)n >= cap) ? 0 : (size_t)n;
}

int outpost_agent_has_credential(void)
{
    char probe[1];
    size_t len = 0;
    int rc = outpost_port_kv_get("credential", probe, 0, &len);
    return rc != 1;
}

outpost_err_t outpost_agent_forget_credential(void)
{
    return outpost_port_kv_erase("credential") == 0 ? OUTPOST_OK : OUTPOST_ERR_STORAGE;
}

static outpost_err_t credential_load(credential_t *out)
{
    char *text = agent_malloc(OUTPOST_AGENT_MAX_MESSAGE);
    if (text == NULL) {
        return OUTPOST_ERR_STORAGE;
    }
    size_t len = 0;
    int rc = outpost_port_kv_get("credential", text, OUTPOST_AGENT_MAX_MESSAGE, &len);
    outpost_err_t err;
    if (rc == 1) {
        err = OUTPOST_ERR_NO_CREDENTIAL;
    } else if (rc != 0) {
        err = OUTPOST_ERR_STORAGE;
    } else {
        const char *why = "";
        err = credential_parse(text, len, out, &why);
        if (err != OUTPOST_OK) {
            LOG_E("the stored credential is unusable: %s", why);
        }
    }
    agent_free(text);
    return err;
}

/* --- the update record ---------------------------------------------------------------- */

typedef struct {
    char version[VERSION_MAX];
    char from[VERSION_MAX];
    /* The slot `from` ran from: where a rollback goes. */
    char slot[17];
    /* "applied", "reported", "rolled-back", or "" when there is none. */
    char state[16];
    char reason[REASON_MAX];
} update_record_t;

static void record_load(update_record_t *record)
{
    memset(record, 0, sizeof *record);
    char text[1024];
    size_t len = 0;
    if (outpost_port_kv_get("update", text, sizeof text, &len) != 0) {
        return;
    }
    cJSON *root = parse_object("update record", text, len);
    if (root == NULL) {
        return;
    }
    const char *version = string_field(root, "version");
    const char *from = string_field(root, "from");
    const char *state = string_field(root, "state");
    const char *reason = string_field(root, "reason");
    const char *slot = string_field(root, "slot");
    if (version != NULL && from != NULL && state != NULL &&
        copy_string(record->version, sizeof record->version, version) &&
        copy_string(record->from, sizeof record->from, from) &&
        copy_string(record->state, sizeof record->state, state)) {
        if (reason != NULL) {
            copy_string(record->reason, sizeof record->reason, reason);
        }
        if (slot != NULL) {
            copy_string(record->slot, sizeof record->slot, slot);
        }
    } else {
        memset(record, 0, sizeof *record);
    }
    cJSON_Delete(root);
}

static int record_store(const update_record_t *record)
{
    cJSON *root = cJSON_CreateObject();
    if (root == NULL || cJSON_AddStringToObject(root, "version", record->version) == NULL ||
        cJSON_AddStringToObject(root, "from", record->from) == NULL ||
        cJSON_AddStringToObject(root, "state", record->state) == NULL ||
        cJSON_AddStringToObject(root, "slot", record->slot) == NULL ||
        (record->reason[0] != '\0' &&
         cJSON_AddStringToObject(root, "reason", record->reason) == NULL)) {
        cJSON_Delete(root);
        return -1;
    }
    char *text = cJSON_PrintUnformatted(root);
    cJSON_Delete(root);
    if (text == NULL) {
        return -1;
    }
    int rc = outpost_port_kv_set("update", text, strlen(text));
    cJSON_free(text);
    return rc;
}

/* --- the agent ------------------------------------------------------------------------ */

typedef struct {
    const outpost_agent_config_t *config;
    credential_t credential;
    outpost_app_info_t app;
    /* Set once a download passed its checks and was finished in the passive slot. */
    bool staged;
    char staged_version[VERSION_MAX];
    /* The response buffer of the JSON calls. */
    char *buffer;
} agent_t;

/* How a call to the device API went. CALL_REFUSED is an HTTP answer (4xx) from the
 * server; CALL_LOCAL a failure before anything was sent (a URL too long, no memory). */
typedef enum { CALL_OK, CALL_NETWORK, CALL_REVOKED, CALL_REFUSED, CALL_LOCAL } call_t;

/* One call to the device API; on CALL_OK the status is 2xx and `agent->buffer` holds
 * the body (NUL-terminated, `*len` bytes). */
static call_t api_call(agent_t *agent, const char *method, const char *path, const char *body,
                       uint32_t timeout_ms, int *status, size_t *len)
{
    char url[URL_MAX];
    int n = snprintf(url, sizeof url, "%s/api/v1/devices/%s/%s", agent->credential.api,
                     agent->credential.device_id, path);
    if (n < 0 || (size_t)n >= sizeof url) {
        LOG_E("the URL for %s is too long", path);
        return CALL_LOCAL;
    }
    size_t got = 0;
    *status = 0;
    if (outpost_port_http_json(method, url, agent->credential.token, body, timeout_ms,
                               agent->buffer, OUTPOST_AGENT_MAX_MESSAGE - 1, &got, status) != 0) {
        return CALL_NETWORK;
    }
    agent->buffer[got] = '\0';
    if (len != NULL) {
        *len = got;
    }
    if (*status == 401 || *status == 403) {
        LOG_E("%s %s: %d: the gateway refused the device token (revoked?)", method, path,
              *status);
        return CALL_REVOKED;
    }
    if (*status < 200 || *status > 299) {
        LOG_W("%s %s: HTTP %d %.200s", method, path, *status, agent->buffer);
        return *status >= 500 ? CALL_NETWORK : CALL_REFUSED;
    }
    return CALL_OK;
}

/* Sends a JSON body built by cJSON; frees it. */
static call_t api_post(agent_t *agent, const char *path, cJSON *body)
{
    if (body == NULL) {
        return CALL_LOCAL;
    }
    char *text = cJSON_PrintUnformatted(body);
    cJSON_Delete(body);
    if (text == NULL) {
        return CALL_LOCAL;
    }
    int status = 0;
    call_t rc = api_call(agent, "POST", path, text, 15000, &status, NULL);
    cJSON_free(text);
    return rc;
}

static call_t report(agent_t *agent, const char *kind, const char *payload)
{
    cJSON *body = cJSON_CreateObject();
    if (body != NULL) {
        cJSON_AddStringToObject(body, "kind", kind);
        cJSON_AddStringToObject(body, "payload", payload);
    }
    char line[REASON_MAX * 2 + 64];
    char quoted[REASON_MAX * 2];
    json_quote(quoted, sizeof quoted, payload);
    snprintf(line, sizeof line, "{\"event\":\"report\",\"kind\":\"%s\",\"payload\":%s}", kind,
             quoted);
    outpost_port_event(line);
    return api_post(agent, "reports", body);
}

static call_t register_device(agent_t *agent)
{
    const outpost_agent_config_t *config = agent->config;
    cJSON *body = cJSON_CreateObject();
    cJSON *properties = cJSON_CreateObject();
    if (body == NULL || properties == NULL) {
        cJSON_Delete(body);
        cJSON_Delete(properties);
        return CALL_LOCAL;
    }
    char secure[12];
    snprintf(secure, sizeof secure, "%" PRIu32, agent->app.secure_version);
    cJSON_AddStringToObject(properties, "chip", agent->app.chip);
    cJSON_AddStringToObject(properties, "project", agent->app.project);
    cJSON_AddStringToObject(properties, "secure_version", secure);
    cJSON_AddStringToObject(properties, "agent", OUTPOST_AGENT_PROTOCOL_VERSION);
    for (size_t i = 0; i < config->property_count; i++) {
        cJSON_AddStringToObject(properties, config->properties[i].key,
                                config->properties[i].value);
    }
    cJSON_AddStringToObject(body, "manufacturer", config->manufacturer);
    cJSON_AddStringToObject(body, "model", config->model);
    cJSON_AddStringToObject(body, "firmwareVersion", agent->app.version);
    cJSON_AddItemToObject(body, "properties", properties);
    call_t rc = api_post(agent, "register", body);
    if (rc == CALL_OK) {
        event2("registered", "version", agent->app.version);
    }
    return rc;
}

/* Backoff between failed calls: 1 s doubling to 30 s, with the attempt count kept by
 * the caller. */
static void backoff(unsigned *attempt)
{
    uint32_t ms = 1000;
    for (unsigned i = 0; i < *attempt && ms < 30000; i++) {
        ms *= 2;
    }
    if (ms > 30000) {
        ms = 30000;
    }
    if (*attempt < 16) {
        (*attempt)++;
    }
    outpost_port_sleep_ms(ms);
}

/* A command reply: {ok: true, payload} or {ok: false, error}. */
static call_t reply(agent_t *agent, uint64_t id, bool ok, const char *text)
{
    char path[64];
    snprintf(path, sizeof path, "commands/%" PRIu64 "/reply", id);
    cJSON *body = cJSON_CreateObject();
    if (body != NULL) {
        cJSON_AddBoolToObject(body, "ok", ok);
        if (ok) {
            cJSON_AddStringToObject(body, "payload", text);
        } else {
            cJSON_AddStringToObject(body, "error", text);
        }
    }
    return api_post(agent, path, body);
}

/* --- downloads ------------------------------------------------------------------------ */

typedef struct {
    agent_t *agent;
    outpost_ota_t *ota;
    outpost_sha256_t *sha;
    uint64_t size;
    uint64_t written;
    /* The offset this attempt asked for, and whether its first bytes came. */
    uint64_t asked;
    bool started;
    int reported_pct;
    char error[REASON_MAX];
} download_t;

static bool download_restart(download_t *dl)
{
    outpost_port_ota_abort(dl->ota);
    outpost_port_sha256_abort(dl->sha);
    dl->ota = outpost_port_ota_begin(dl->size);
    dl->sha = outpost_port_sha256_start();
    dl->written = 0;
    return dl->ota != NULL && dl->sha != NULL;
}

static int download_sink(void *ctx, const outpost_http_head_t *head, const uint8_t *data,
                         size_t len)
{
    download_t *dl = ctx;
    if (!dl->started) {
        dl->started = true;
        char line[128];
        snprintf(line, sizeof line,
                 "{\"event\":\"download\",\"offset\":%" PRIu64 ",\"status\":%d}", dl->asked,
                 head->status);
        outpost_port_event(line);
        if (head->status == 200 && dl->written > 0) {
            /* The server ignored the range: start over. */
            LOG_W("the server sent the whole file instead of a range; starting over");
            if (!download_restart(dl)) {
                snprintf(dl->error, sizeof dl->error, "cannot restart the download");
                return 1;
            }
        } else if (head->status == 206) {
            if (head->range_start < 0 || (uint64_t)head->range_start != dl->written) {
                snprintf(dl->error, sizeof dl->error,
                         "the server resumed at byte %" PRId64 ", not %" PRIu64,
                         head->range_start, dl->written);
                return 1;
            }
        } else if (head->status != 200) {
            snprintf(dl->error, sizeof dl->error, "HTTP %d", head->status);
            return 1;
        }
    }
    if (len > dl->size - dl->written) {
        snprintf(dl->error, sizeof dl->error, "the file is longer than the %" PRIu64 " bytes announced",
                 dl->size);
        return 1;
    }
    if (outpost_port_ota_write(dl->ota, data, len) != 0) {
        snprintf(dl->error, sizeof dl->error, "flash write failed at byte %" PRIu64,
                 dl->written);
        return 1;
    }
    outpost_port_sha256_update(dl->sha, data, len);
    dl->written += len;
    return 0;
}

static bool hex_sha256(const char *text)
{
    if (strlen(text) != 64) {
        return false;
    }
    for (const char *p = text; *p != '\0'; p++) {
        if (!((*p >= '0' && *p <= '9') || (*p >= 'a' && *p <= 'f'))) {
            return false;
        }
    }
    return true;
}

/* Downloads, checks and finishes the image; reports progress 100 or failed. */
static void download(agent_t *agent, const char *url, uint64_t size, const char *sha256,
                     const char *version)
{
    download_t dl = {.agent = agent, .size = size, .reported_pct = 0};
    dl.ota = outpost_port_ota_begin(size);
    dl.sha = outpost_port_sha256_start();
    if (dl.ota == NULL || dl.sha == NULL) {
        outpost_port_sha256_abort(dl.sha);
        if (dl.ota != NULL) {
            outpost_port_ota_abort(dl.ota);
        }
        report(agent, "failed", "cannot open the passive OTA slot for the image");
        return;
    }
    /* The image comes in segments, one request each (Range: bytes=N-M): progress is
     * reported between them, never while a connection is open (on a device that would
     * be a second TLS session and a deep stack), and a cut costs one segment at most.
     * A segment that fails is retried from where it stopped, up to DOWNLOAD_ATTEMPTS
     * times in a row. */
    uint64_t segment = agent->config->segment_bytes ? agent->config->segment_bytes : 256 * 1024;
    unsigned attempt = 0;
    int failures = 0;
    while (dl.written < size && failures < DOWNLOAD_ATTEMPTS) {
        outpost_http_head_t head;
        uint64_t before = dl.written;
        /* Segments are aligned: a resumed one ends where it would have. */
        uint64_t end = (dl.written / segment + 1) * segment;
        uint64_t last = (end < size ? end : size) - 1;
        dl.asked = dl.written;
        dl.started = false;
        dl.error[0] = '\0';
        /* The firmware server's ETag is the sha256: a range only continues the same file. */
        int rc = outpost_port_http_download(url, dl.written, last, sha256, download_sink, &dl,
                                            &head);
        if (rc == 1 || (rc == 0 && dl.error[0] != '\0')) {
            break; /* refused: not worth another try */
        }
        if (rc == 0 && head.status != 200 && head.status != 206) {
            snprintf(dl.error, sizeof dl.error, "HTTP %d", head.status);
            break;
        }
        if (dl.written > last || dl.written == size) {
            failures = 0;
            attempt = 0;
        } else {
            failures++;
            snprintf(dl.error, sizeof dl.error,
                     "the connection ended at byte %" PRIu64 " of %" PRIu64, dl.written, size);
            LOG_W("download cut at byte %" PRIu64 "; resuming", dl.written);
            if (dl.written > before) {
                failures = 1; /* it moved: only this stall counts */
            }
            backoff(&attempt);
        }
        /* Progress every quarter; 100 % only once the image is checked. */
        int pct = (int)(dl.written * 100 / size);
        if (pct >= dl.reported_pct + 25 && pct < 100) {
            dl.reported_pct = pct - pct % 25;
            char text[8];
            snprintf(text, sizeof text, "%d", dl.reported_pct);
            report(agent, "progress", text);
        }
    }
    if (dl.written < size) {
        outpost_port_sha256_abort(dl.sha);
        outpost_port_ota_abort(dl.ota);
        char reason[REASON_MAX + 16];
        snprintf(reason, sizeof reason, "download: %s", dl.error[0] ? dl.error : "incomplete");
        report(agent, "failed", reason);
        return;
    }
    uint8_t digest[32];
    outpost_port_sha256_finish(dl.sha, digest);
    char hex[65];
    for (int i = 0; i < 32; i++) {
        snprintf(hex + 2 * i, 3, "%02x", digest[i]);
    }
    if (strcmp(hex, sha256) != 0) {
        outpost_port_ota_abort(dl.ota);
        char reason[REASON_MAX];
        snprintf(reason, sizeof reason, "image check failed: sha256 %.16s…, expected %.16s…", hex,
                 sha256);
        report(agent, "failed", reason);
        return;
    }
    if (outpost_port_ota_end(dl.ota) != 0) {
        report(agent, "failed", "the platform refused the image (esp_ota_end)");
        return;
    }
    agent->staged = true;
    copy_string(agent->staged_version, sizeof agent->staged_version, version);
    char line[96];
    snprintf(line, sizeof line, "{\"event\":\"downloaded\",\"bytes\":%" PRIu64 "}", size);
    outpost_port_event(line);
    report(agent, "progress", "100");
}

/* --- commands ------------------------------------------------------------------------- */

/* What ota-begin asks for. */
typedef struct {
    char url[URL_MAX];
    uint64_t size;
    char sha256[65];
    char version[VERSION_MAX];
} begin_t;

/* Reads ota-begin's payload {url, size, sha256, version}; NULL or the reason it is refused. */
static const char *ota_begin_parse(const char *payload, size_t len, begin_t *out)
{
    cJSON *begin = parse_object("ota-begin", payload, len);
    if (begin == NULL) {
        return "ota-begin: the payload is not a JSON object";
    }
    const char *url = string_field(begin, "url");
    const cJSON *size = cJSON_GetObjectItemCaseSensitive(begin, "size");
    const char *sha256 = string_field(begin, "sha256");
    const char *version = string_field(begin, "version");
    const char *error = NULL;
    if (url == NULL || !copy_string(out->url, sizeof out->url, url) ||
        (strncmp(url, "http://", 7) != 0 && strncmp(url, "https://", 8) != 0)) {
        error = "ota-begin: url is missing, too long or not an http(s) URL";
    } else if (!cJSON_IsNumber(size) || size->valuedouble < 1 ||
               !whole_number(size->valuedouble, 16.0 * 1024 * 1024)) {
        error = "ota-begin: size is missing or not a whole number from 1 byte to 16 MiB";
    } else if (sha256 == NULL || !hex_sha256(sha256)) {
        error = "ota-begin: sha256 is not 64 lowercase hex digits";
    } else if (version == NULL || version[0] == '\0' ||
               !copy_string(out->version, sizeof out->version, version)) {
        error = "ota-begin: version is missing or longer than 31 bytes";
    } else {
        out->size = (uint64_t)size->valuedouble;
        copy_string(out->sha256, sizeof out->sha256, sha256);
    }
    cJSON_Delete(begin);
    return error;
}

/* ota-apply: payload = the version. Boots the staged image. */
static void ota_apply(agent_t *agent, uint64_t id, const char *payload)
{
    if (!agent->staged) {
        reply(agent, id, false, "nothing downloaded");
        return;
    }
    if (strcmp(payload, agent->staged_version) != 0) {
        char why[96];
        snprintf(why, sizeof why, "the downloaded image is %s, not %.32s", agent->staged_version,
                 payload);
        reply(agent, id, false, why);
        return;
    }
    update_record_t record = {0};
    copy_string(record.version, sizeof record.version, agent->staged_version);
    copy_string(record.from, sizeof record.from, agent->app.version);
    copy_string(record.state, sizeof record.state, "applied");
    if (outpost_port_running_slot(record.slot) != 0 || record_store(&record) != 0 ||
        outpost_port_ota_set_boot() != 0) {
        outpost_port_kv_erase("update");
        reply(agent, id, false, "cannot select the new image for the next boot");
        return;
    }
    reply(agent, id, true, agent->staged_version);
    event2("rebooting", "version", agent->staged_version);
    outpost_port_reboot();
}

/* ota-rollback: boots the image that ran before, if the new one runs; answers with the
 * version the device runs afterwards. */
static void ota_rollback(agent_t *agent, uint64_t id)
{
    update_record_t record;
    record_load(&record);
    bool new_image_runs = record.state[0] != '\0' && strcmp(record.state, "rolled-back") != 0 &&
                          strcmp(record.version, agent->app.version) == 0 &&
                          strcmp(record.from, agent->app.version) != 0;
    if (!new_image_runs) {
        /* Already on the previous image (the bootloader or the agent took it back), or
         * nothing was updated: booting the other slot would start the failed image. */
        reply(agent, id, true, agent->app.version);
        return;
    }
    /* Checked before answering: the reply says what the device will run. */
    char why[96];
    bool pending = outpost_port_image_state() == OUTPOST_IMAGE_PENDING;
    if (record.slot[0] == '\0' || !outpost_port_slot_bootable(record.slot)) {
        snprintf(why, sizeof why, "the previous image (slot %s) cannot be booted", record.slot);
        reply(agent, id, false, why);
        return;
    }
    if (!pending && outpost_port_boot_slot(record.slot) != 0) {
        snprintf(why, sizeof why, "slot %s cannot be selected for the next boot", record.slot);
        reply(agent, id, false, why);
        return;
    }
    copy_string(record.state, sizeof record.state, "rolled-back");
    if (record_store(&record) != 0) {
        reply(agent, id, false, "cannot record the rollback");
        return;
    }
    reply(agent, id, true, record.from);
    event2("rolled_back", "version", record.from);
    if (pending) {
        /* Marks the new image invalid; the bootloader starts the previous one. */
        outpost_port_image_rollback();
        LOG_E("the pending image cannot be given up");
    } else {
        outpost_port_reboot();
    }
}

/* What wifi-rotate asks for. */
typedef struct {
    char ssid[33];
    char passphrase[65];
    uint32_t fallback_secs;
} rotate_t;

/* Reads wifi-rotate's payload {ssid, passphrase, fallbackSecs}; NULL or the reason. */
static const char *wifi_rotate_parse(const char *payload, size_t len, rotate_t *out)
{
    cJSON *rotate = parse_object("wifi-rotate", payload, len);
    if (rotate == NULL) {
        return "wifi-rotate: the payload is not a JSON object";
    }
    const char *ssid = string_field(rotate, "ssid");
    const char *passphrase = string_field(rotate, "passphrase");
    const cJSON *fallback = cJSON_GetObjectItemCaseSensitive(rotate, "fallbackSecs");
    const char *error = NULL;
    if (ssid == NULL || ssid[0] == '\0' || !copy_string(out->ssid, sizeof out->ssid, ssid)) {
        error = "wifi-rotate: ssid is missing or longer than 32 bytes";
    } else if (passphrase == NULL || strlen(passphrase) < 8 ||
               !copy_string(out->passphrase, sizeof out->passphrase, passphrase)) {
        error = "wifi-rotate: passphrase is missing or not 8-64 characters";
    } else if (!cJSON_IsNumber(fallback) || fallback->valuedouble < 30 ||
               fallback->valuedouble > 3600) {
        error = "wifi-rotate: fallbackSecs is missing or not 30-3600";
    } else {
        out->fallback_secs = (uint32_t)fallback->valuedouble;
    }
    cJSON_Delete(rotate);
    return error;
}

/* Joins `ssid` again after a failed rotation, retrying: the device must not end up on no
 * network. */
static void wifi_fall_back(const char *ssid, const char *passphrase)
{
    char why[96];
    for (int attempt = 0; attempt < 3; attempt++) {
        if (outpost_port_wifi_join(ssid, passphrase, 30000, why, sizeof why) == 0) {
            outpost_port_wifi_keep();
            event2("wifi_fallback", "ssid", ssid);
            return;
        }
        LOG_E("cannot join %s again: %s", ssid, why);
        outpost_port_sleep_ms(2000);
    }
    /* The old network is kept in flash: a restart joins it again. */
    LOG_E("the old network %s cannot be joined; restarting", ssid);
    outpost_port_reboot();
}

/* Reports the outcome of a rotation, retrying a few times: the device may have just
 * changed networks. */
static void report_rotation(agent_t *agent, const char *kind, const char *payload)
{
    unsigned attempt = 0;
    for (int tries = 0; tries < 5 && report(agent, kind, payload) == CALL_NETWORK; tries++) {
        backoff(&attempt);
    }
}

/* wifi-rotate: joins the new network with the old one as the fallback for fallbackSecs;
 * reports done (the new SSID) once the gateway is reached over it, or falls back and
 * reports failed. */
static void wifi_rotate(agent_t *agent, uint64_t id, const rotate_t *rotate)
{
    char old_ssid[33];
    char old_passphrase[65];
    if (outpost_port_wifi_current(old_ssid, old_passphrase) != 0) {
        reply(agent, id, false, "wifi-rotate: the current network cannot be read");
        return;
    }
    /* The reply goes out over the old network, before the device leaves it. */
    if (reply(agent, id, true, "") != CALL_OK) {
        return;
    }
    uint64_t fallback_ms = (uint64_t)rotate->fallback_secs * 1000u;
    uint64_t deadline = outpost_port_now_ms() + fallback_ms;
    char why[96];
    char reason[REASON_MAX + 96];
    event2("wifi_joining", "ssid", rotate->ssid);
    if (outpost_port_wifi_join(rotate->ssid, rotate->passphrase,
                               fallback_ms < 30000 ? (uint32_t)fallback_ms : 30000, why,
                               sizeof why) != 0) {
        snprintf(reason, sizeof reason, "cannot join %s: %s; back on %s", rotate->ssid, why,
                 old_ssid);
        wifi_fall_back(old_ssid, old_passphrase);
        wipe(old_passphrase, sizeof old_passphrase);
        report_rotation(agent, "failed", reason);
        return;
    }
    unsigned attempt = 0;
    for (;;) {
        call_t rc = register_device(agent);
        if (rc == CALL_OK || rc == CALL_REVOKED || rc == CALL_REFUSED) {
            /* The new network works: it becomes the one the device comes back to. */
            outpost_port_wifi_keep();
            wipe(old_passphrase, sizeof old_passphrase);
            event2("wifi_joined", "ssid", rotate->ssid);
            report_rotation(agent, "done", rotate->ssid);
            return;
        }
        if (outpost_port_now_ms() >= deadline) {
            break;
        }
        backoff(&attempt);
        if (attempt > 3) {
            attempt = 3;
        }
    }
    snprintf(reason, sizeof reason,
             "joined %s but the gateway was not reachable within %" PRIu32 " s; back on %s",
             rotate->ssid, rotate->fallback_secs, old_ssid);
    wifi_fall_back(old_ssid, old_passphrase);
    wipe(old_passphrase, sizeof old_passphrase);
    report_rotation(agent, "failed", reason);
}

static void command(agent_t *agent, size_t len)
{
    cJSON *root = parse_object("command", agent->buffer, len);
    if (root == NULL) {
        return;
    }
    const cJSON *id_item = cJSON_GetObjectItemCaseSensitive(root, "id");
    const char *name = string_field(root, "command");
    const char *encoded = string_field(root, "payloadBase64");
    if (!cJSON_IsNumber(id_item) || !whole_number(id_item->valuedouble, 9007199254740991.0) ||
        name == NULL || encoded == NULL) {
        LOG_E("a command without id (a whole number), command or payloadBase64");
        cJSON_Delete(root);
        return;
    }
    uint64_t id = (uint64_t)id_item->valuedouble;
    char command_name[24];
    snprintf(command_name, sizeof command_name, "%s", name);
    /* The payload is decoded out of the response buffer: replies reuse it. */
    size_t encoded_len = strlen(encoded);
    size_t cap = encoded_len / 4 * 3;
    uint8_t *payload = agent_malloc(cap + 1);
    int payload_len =
        payload != NULL ? outpost_port_base64_decode(encoded, encoded_len, payload, cap) : -1;
    cJSON_Delete(root);
    event2("command", "command", command_name);
    if (payload_len < 0) {
        agent_free(payload);
        reply(agent, id, false, "payloadBase64 is not base64");
        return;
    }
    payload[payload_len] = '\0';
    if (strcmp(command_name, "ota-begin") == 0) {
        begin_t begin;
        const char *error = ota_begin_parse((const char *)payload, (size_t)payload_len, &begin);
        agent_free(payload);
        agent->staged = false;
        if (error != NULL) {
            reply(agent, id, false, error);
        } else if (reply(agent, id, true, "") == CALL_OK) {
            /* A new update: what happened to the last one no longer matters. */
            outpost_port_kv_erase("update");
            download(agent, begin.url, begin.size, begin.sha256, begin.version);
        }
        return;
    }
    if (strcmp(command_name, "ota-apply") == 0) {
        char version[VERSION_MAX];
        bool fits = copy_string(version, sizeof version, (const char *)payload);
        agent_free(payload);
        if (fits) {
            ota_apply(agent, id, version);
        } else {
            reply(agent, id, false, "ota-apply: the version is longer than 31 bytes");
        }
        return;
    }
    if (strcmp(command_name, "wifi-rotate") == 0) {
        rotate_t rotate;
        const char *error = wifi_rotate_parse((const char *)payload, (size_t)payload_len, &rotate);
        /* The passphrase does not stay in memory longer than needed: the decoded payload,
         * the command as it came (payload and payloadBase64) and the parsed copy. */
        wipe(payload, (size_t)payload_len);
        agent_free(payload);
        wipe(agent->buffer, OUTPOST_AGENT_MAX_MESSAGE);
        if (error != NULL) {
            reply(agent, id, false, error);
        } else {
            wifi_rotate(agent, id, &rotate);
        }
        wipe(&rotate, sizeof rotate);
        return;
    }
    agent_free(payload);
    if (strcmp(command_name, "ota-cancel") == 0) {
        agent->staged = false;
        reply(agent, id, true, "");
    } else if (strcmp(command_name, "ota-rollback") == 0) {
        ota_rollback(agent, id);
    } else {
        char why[64];
        snprintf(why, sizeof why, "unknown command %.24s", command_name);
        reply(agent, id, false, why);
    }
}

/* --- the boot sequence and the loop ----------------------------------------------------- */

/* After a reboot into (or back from) an update: tell the gateway how it went. */
static void report_update(agent_t *agent)
{
    update_record_t record;
    record_load(&record);
    if (strcmp(record.state, "applied") != 0) {
        return;
    }
    bool runs = strcmp(record.version, agent->app.version) == 0;
    char why[REASON_MAX + 128];
    snprintf(why, sizeof why, "%s did not start (%s); the device runs %s again", record.version,
             record.reason[0]                    ? record.reason
             : outpost_port_image_last_rejected() ? "the bootloader rejected it"
                                                  : "the previous image booted",
             agent->app.version);
    /* The gateway must hear it: until it does, the update looks unfinished and may be
     * rolled back. Network errors are retried; an answer (even a refusal) ends it. */
    call_t rc;
    unsigned attempt = 0;
    while ((rc = runs ? report(agent, "done", agent->app.version) : report(agent, "failed", why)) ==
           CALL_NETWORK) {
        backoff(&attempt);
    }
    if (rc != CALL_REVOKED) {
        copy_string(record.state, sizeof record.state, "reported");
        record_store(&record);
    }
}

/* A new image runs unconfirmed: it is kept once it reaches the gateway; if it cannot
 * within the confirm timeout, the previous image is booted. Returns the registration's
 * outcome. */
static call_t confirm_new_image(agent_t *agent)
{
    uint32_t timeout = agent->config->confirm_timeout_ms ? agent->config->confirm_timeout_ms
                                                         : 120000;
    uint64_t deadline = outpost_port_now_ms() + timeout;
    unsigned attempt = 0;
    for (;;) {
        call_t rc = register_device(agent);
        if (rc == CALL_OK || rc == CALL_REVOKED || rc == CALL_REFUSED) {
            /* The new image reached the gateway: it works. */
            if (outpost_port_image_confirm() == 0) {
                event2("confirmed", "version", agent->app.version);
            }
            return rc;
        }
        if (outpost_port_now_ms() >= deadline) {
            update_record_t record;
            record_load(&record);
            if (record.state[0] != '\0') {
                snprintf(record.reason, sizeof record.reason,
                         "it did not reach the gateway within %" PRIu32 " s", timeout / 1000);
                record_store(&record);
            }
            event2("giving_up", "version", agent->app.version);
            outpost_port_image_rollback();
            return CALL_NETWORK; /* only when the rollback failed */
        }
        backoff(&attempt);
        if (attempt > 3) {
            attempt = 3; /* keep trying every few seconds until the deadline */
        }
    }
}

outpost_err_t outpost_agent_run(const outpost_agent_config_t *config)
{
    use_agent_heap();
    agent_t agent = {.config = config};
    outpost_err_t err = credential_load(&agent.credential);
    if (err != OUTPOST_OK) {
        return err;
    }
    if (outpost_port_app_info(&agent.app) != 0) {
        credential_free(&agent.credential);
        return OUTPOST_ERR_STORAGE;
    }
    agent.buffer = agent_malloc(OUTPOST_AGENT_MAX_MESSAGE);
    if (agent.buffer == NULL) {
        credential_free(&agent.credential);
        return OUTPOST_ERR_STORAGE;
    }
    outpost_port_http_set_ca(agent.credential.ca_pem);
    uint32_t wait = config->poll_wait_s ? config->poll_wait_s : 20;
    if (wait > 60) {
        wait = 60;
    }

    call_t rc;
    unsigned attempt = 0;
    if (outpost_port_image_state() == OUTPOST_IMAGE_PENDING) {
        rc = confirm_new_image(&agent);
    } else {
        while ((rc = register_device(&agent)) == CALL_NETWORK) {
            backoff(&attempt);
        }
    }
    if (rc == CALL_REVOKED) {
        err = OUTPOST_ERR_REVOKED;
        goto out;
    }
    report_update(&agent);

    char path[32];
    snprintf(path, sizeof path, "next?wait=%" PRIu32, wait);
    attempt = 0;
    for (;;) {
        int status = 0;
        size_t len = 0;
        rc = api_call(&agent, "GET", path, NULL, (wait + 15) * 1000, &status, &len);
        if (rc == CALL_REVOKED) {
            err = OUTPOST_ERR_REVOKED;
            break;
        }
        if (rc != CALL_OK) {
            backoff(&attempt);
            continue;
        }
        attempt = 0;
        if (status == 204) {
            continue;
        }
        command(&agent, len);
        char line[96];
        snprintf(line, sizeof line, "{\"event\":\"heap\",\"now\":%zu,\"peak\":%zu}",
                 outpost_agent_heap_now(), outpost_agent_heap_peak());
        outpost_port_event(line);
    }
out:
    /* The port must not keep a pointer to the CA freed here. */
    outpost_port_http_set_ca(NULL);
    agent_free(agent.buffer);
    credential_free(&agent.credential);
    return err;
}
