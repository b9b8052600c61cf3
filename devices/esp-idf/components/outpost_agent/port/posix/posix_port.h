/*
 * The POSIX port of the Outpost agent: Linux with libcurl and OpenSSL, a directory as
 * the device's flash (two OTA slots, otadata, NVS). It is what the gateway's tests run,
 * and a way to try the agent without a board.
 *
 * The directory holds slot0.bin and slot1.bin (ESP-IDF app images), otadata (which slot
 * boots and in what state, as ESP-IDF's bootloader keeps it) and nvs/ (one file per
 * key), and wifi (the network the device is on). A reboot re-executes the process,
 * which "boots" through outpost_posix_boot. Wi-Fi is simulated: the access points in
 * range are given with outpost_posix_add_network; joining one needs its passphrase.
 */
#ifndef OUTPOST_POSIX_PORT_H
#define OUTPOST_POSIX_PORT_H

#include <stdint.h>

/** Failures the port injects on purpose, for the tests (all off by default). */
typedef struct {
    /** The download is cut once, when it reaches this byte of the file (0: never). */
    uint64_t cut_after;
    /** The byte at this offset of the downloaded file arrives flipped (0: never). */
    uint64_t corrupt_at;
    /** A new image that runs unconfirmed cannot reach the network. */
    int offline_new_image;
    /** The gateway cannot be reached over this network (SSID; empty: none). */
    char unreachable_on[33];
} outpost_posix_faults_t;

/**
 * An access point in the device's range (at most 4). The first one added is the network
 * the device is on when its flash directory is new. Call before outpost_posix_boot.
 * Returns 0, or -1 when there are too many or a field is too long.
 */
int outpost_posix_add_network(const char *ssid, const char *passphrase);

/**
 * Opens the flash directory `dir` (made when missing; `seed_image` is then written to
 * slot 0), runs the bootloader's decision (a new image boots pending; a pending image
 * that booted before without being confirmed is rejected and the previous slot
 * boots), and keeps `argv` for reboots. Returns 0, or -1 with the reason on stderr.
 */
int outpost_posix_boot(const char *dir, const char *seed_image, char **argv,
                       const outpost_posix_faults_t *faults);

#endif /* OUTPOST_POSIX_PORT_H */
