/*
 * outpost-agent-posix: the Outpost agent as a Linux program, with a directory as the
 * device's flash (posix_port.h). The gateway's tests run it; it also lets a vendor try
 * the agent against a gateway without a board.
 *
 *   outpost-agent-posix --flash DIR [--image FIRST.bin] [--credential FILE]
 *       --model DEVICE-TYPE [--manufacturer M] [--property KEY=VALUE]...
 *       [--poll-wait S] [--confirm-timeout-ms MS] [--segment-bytes N]
 *       [--network SSID:PASSPHRASE]...
 *       [--fault cut:BYTES|corrupt:OFFSET|offline-new-image|unreachable-on:SSID]...
 *
 * Events go to stdout, one JSON object per line; the log goes to stderr.
 * Exit codes: 2 no credential, 3 the credential was revoked, 1 other errors, 64 usage.
 */
#define _POSIX_C_SOURCE 200809L

#include <curl/curl.h>
#include <errno.h>
#include <getopt.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "outpost_agent.h"
#include "posix_port.h"

#define MAX_PROPERTIES 8

static int usage(const char *why)
{
    fprintf(stderr,
            "outpost-agent-posix: %s\n"
            "usage: outpost-agent-posix --flash DIR [--image FIRST.bin] [--credential FILE]\n"
            "       --model DEVICE-TYPE [--manufacturer M] [--property KEY=VALUE]...\n"
            "       [--poll-wait S] [--confirm-timeout-ms MS] [--segment-bytes N]\n"
            "       [--network SSID:PASSPHRASE]...\n"
            "       [--fault cut:BYTES|corrupt:OFFSET|offline-new-image|unreachable-on:SSID]...\n",
            why);
    return 64;
}

static int parse_u64(const char *text, unsigned long long *out)
{
    char *end = NULL;
    errno = 0;
    *out = strtoull(text, &end, 10);
    return (errno != 0 || end == text || *end != '\0' || text[0] == '-') ? -1 : 0;
}

/* Hands the agent's endpoint the requests in `path`, one per line, as the gateway wrote
 * them to the `outpost-agent` protocomm endpoint (the credential whole, or in chunks). */
static int read_credential(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (f == NULL) {
        fprintf(stderr, "outpost-agent-posix: cannot read %s: %s\n", path, strerror(errno));
        return -1;
    }
    /* A request over the limit reaches the endpoint with one byte too many: refused there. */
    char text[OUTPOST_AGENT_MAX_MESSAGE + 2];
    int ok = -1;
    while (fgets(text, sizeof text, f) != NULL) {
        size_t len = strcspn(text, "\n");
        bool whole_line = text[len] == '\n' || feof(f);
        text[len] = '\0';
        if (len == 0) {
            continue;
        }
        char answer[160];
        size_t n = outpost_agent_endpoint((const uint8_t *)text, len, answer, sizeof answer);
        printf("{\"event\":\"endpoint\",\"answer\":%.*s}\n", (int)n, answer);
        fflush(stdout);
        ok = n > 0 && strcmp(answer, "{\"status\":\"ok\"}") == 0 ? 0 : -1;
        if (n == 0 || strstr(answer, "\"error\"") != NULL || !whole_line) {
            ok = -1;
            break;
        }
    }
    fclose(f);
    return ok;
}

int main(int argc, char **argv)
{
    static const struct option options[] = {
        {"flash", required_argument, NULL, 'f'},
        {"image", required_argument, NULL, 'i'},
        {"credential", required_argument, NULL, 'c'},
        {"model", required_argument, NULL, 'm'},
        {"manufacturer", required_argument, NULL, 'M'},
        {"property", required_argument, NULL, 'p'},
        {"poll-wait", required_argument, NULL, 'w'},
        {"confirm-timeout-ms", required_argument, NULL, 't'},
        {"fault", required_argument, NULL, 'F'},
        {"network", required_argument, NULL, 'n'},
        {"segment-bytes", required_argument, NULL, 's'},
        {NULL, 0, NULL, 0},
    };
    const char *flash = NULL;
    const char *image = NULL;
    const char *credential = NULL;
    outpost_agent_config_t config = {.manufacturer = "Espressif"};
    outpost_property_t properties[MAX_PROPERTIES];
    char property_text[MAX_PROPERTIES][128];
    outpost_posix_faults_t faults = {0};
    unsigned long long number = 0;
    int opt;
    while ((opt = getopt_long(argc, argv, "", options, NULL)) != -1) {
        switch (opt) {
        case 'f': flash = optarg; break;
        case 'i': image = optarg; break;
        case 'c': credential = optarg; break;
        case 'm': config.model = optarg; break;
        case 'M': config.manufacturer = optarg; break;
        case 'p': {
            char *eq = strchr(optarg, '=');
            if (config.property_count == MAX_PROPERTIES || eq == NULL ||
                strlen(optarg) >= sizeof property_text[0]) {
                return usage("--property takes KEY=VALUE, at most 8 times");
            }
            char *copy = property_text[config.property_count];
            strcpy(copy, optarg);
            copy[eq - optarg] = '\0';
            properties[config.property_count].key = copy;
            properties[config.property_count].value = copy + (eq - optarg) + 1;
            config.property_count++;
            break;
        }
        case 'w':
            if (parse_u64(optarg, &number) != 0 || number < 1 || number > 60) {
                return usage("--poll-wait takes 1-60 seconds");
            }
            config.poll_wait_s = (uint32_t)number;
            break;
        case 't':
            if (parse_u64(optarg, &number) != 0 || number < 1 || number > 3600000) {
                return usage("--confirm-timeout-ms takes 1-3600000");
            }
            config.confirm_timeout_ms = (uint32_t)number;
            break;
        case 'F':
            if (strncmp(optarg, "cut:", 4) == 0 && parse_u64(optarg + 4, &number) == 0 &&
                number > 0) {
                faults.cut_after = number;
            } else if (strncmp(optarg, "corrupt:", 8) == 0 &&
                       parse_u64(optarg + 8, &number) == 0 && number > 0) {
                faults.corrupt_at = number;
            } else if (strcmp(optarg, "offline-new-image") == 0) {
                faults.offline_new_image = 1;
            } else if (strncmp(optarg, "unreachable-on:", 15) == 0 && optarg[15] != '\0' &&
                       strlen(optarg + 15) < sizeof faults.unreachable_on) {
                strcpy(faults.unreachable_on, optarg + 15);
            } else {
                return usage("--fault takes cut:BYTES, corrupt:OFFSET, offline-new-image or "
                             "unreachable-on:SSID");
            }
            break;
        case 's':
            if (parse_u64(optarg, &number) != 0 || number < 1024 || number > 16u * 1024 * 1024) {
                return usage("--segment-bytes takes 1024 to 16 MiB");
            }
            config.segment_bytes = (uint32_t)number;
            break;
        case 'n': {
            char *colon = strchr(optarg, ':');
            if (colon == NULL) {
                return usage("--network takes SSID:PASSPHRASE");
            }
            *colon = '\0';
            if (outpost_posix_add_network(optarg, colon + 1) != 0) {
                return usage("--network: at most 4, SSID 1-32 bytes, passphrase up to 64");
            }
            *colon = ':';
            break;
        }
        default: return usage("unknown option");
        }
    }
    if (optind != argc) {
        return usage("unexpected argument");
    }
    if (flash == NULL || config.model == NULL) {
        return usage("--flash and --model are required");
    }
    config.properties = properties;
    if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) {
        fprintf(stderr, "outpost-agent-posix: libcurl did not initialise\n");
        return 1;
    }
    int code = 1;
    if (outpost_posix_boot(flash, image, argv, &faults) != 0) {
        goto out;
    }
    if (credential != NULL && !outpost_agent_has_credential() && read_credential(credential) != 0) {
        goto out;
    }
    outpost_err_t err = outpost_agent_run(&config);
    fprintf(stderr, "outpost-agent-posix: the agent stopped (%d)\n", (int)err);
    code = err == OUTPOST_ERR_NO_CREDENTIAL ? 2 : err == OUTPOST_ERR_REVOKED ? 3 : 1;
out:
    curl_global_cleanup();
    return code;
}
