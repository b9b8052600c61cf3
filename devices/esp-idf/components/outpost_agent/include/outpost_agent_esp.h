/*
 * ESP-IDF glue for the Outpost agent: the `outpost-agent` protocomm endpoint the
 * gateway writes the credential to during provisioning, and a task that runs the agent.
 */
#ifndef OUTPOST_AGENT_ESP_H
#define OUTPOST_AGENT_ESP_H

#include <stdint.h>
#include <sys/types.h>

#include "esp_err.h"
#include "outpost_agent.h"

#ifdef __cplusplus
extern "C" {
#endif

/**
 * A protocomm request handler (protocomm_req_handler_t) for the `outpost-agent`
 * endpoint: stores the credential and answers `{"status":"ok"}` or
 * `{"status":"error","reason":…}`. Register it with the provisioning manager:
 *
 *   wifi_prov_mgr_endpoint_create(OUTPOST_AGENT_ENDPOINT);          // before start
 *   wifi_prov_mgr_start_provisioning(...);
 *   wifi_prov_mgr_endpoint_register(OUTPOST_AGENT_ENDPOINT,
 *                                   outpost_agent_protocomm_handler, NULL);
 */
esp_err_t outpost_agent_protocomm_handler(uint32_t session_id, const uint8_t *inbuf,
                                          ssize_t inlen, uint8_t **outbuf, ssize_t *outlen,
                                          void *priv_data);

/**
 * The capability list to announce in proto-ver with
 * wifi_prov_mgr_set_app_info("outpost", OUTPOST_AGENT_PROTOCOL_VERSION, caps, 1).
 */
extern const char *outpost_agent_capabilities[1];

/**
 * Starts a FreeRTOS task that runs outpost_agent_run(config) whenever a credential is
 * stored (it waits for one, and for a new one after a revocation). `config` must stay
 * valid. Returns ESP_OK or ESP_ERR_NO_MEM.
 */
esp_err_t outpost_agent_start(const outpost_agent_config_t *config);

#ifdef __cplusplus
}
#endif

#endif /* OUTPOST_AGENT_ESP_H */
