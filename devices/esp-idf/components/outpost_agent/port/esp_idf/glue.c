/*
 * ESP-IDF glue (outpost_agent_esp.h): the protocomm endpoint and the agent's task.
 */
#include <stdlib.h>
#include <string.h>

#include "esp_log.h"
#include "esp_system.h"
#include "freertos/FreeRTOS.h"
#include "freertos/task.h"
#include "outpost_agent_esp.h"

/* The agent's own frames take about 4 KiB on its deepest path (a registration from the
 * command loop: URL and message buffers); an mbedTLS handshake needs several more. No
 * HTTP call is ever made while another is open (downloads report between segments). */
#define AGENT_STACK 16384

const char *outpost_agent_capabilities[1] = {"agent"};

esp_err_t outpost_agent_protocomm_handler(uint32_t session_id, const uint8_t *inbuf,
                                          ssize_t inlen, uint8_t **outbuf, ssize_t *outlen,
                                          void *priv_data)
{
    (void)session_id;
    (void)priv_data;
    char answer[160];
    size_t n = inbuf != NULL && inlen > 0
                   ? outpost_agent_endpoint(inbuf, (size_t)inlen, answer, sizeof answer)
                   : outpost_agent_endpoint((const uint8_t *)"", 0, answer, sizeof answer);
    /* protocomm frees the answer. */
    *outbuf = malloc(n);
    if (*outbuf == NULL) {
        return ESP_ERR_NO_MEM;
    }
    memcpy(*outbuf, answer, n);
    *outlen = (ssize_t)n;
    return ESP_OK;
}

static void agent_task(void *arg)
{
    const outpost_agent_config_t *config = arg;
    for (;;) {
        outpost_err_t err = outpost_agent_run(config);
        if (err == OUTPOST_ERR_REVOKED || err == OUTPOST_ERR_INVALID ||
            err == OUTPOST_ERR_TOO_LARGE) {
            /* The gateway no longer takes this credential, or it cannot be used: forget it
             * and restart, so the app provisions again (it does when none is stored). */
            ESP_LOGW("outpost", "the credential is %s; restarting to be onboarded again",
                     err == OUTPOST_ERR_REVOKED ? "revoked" : "unusable");
            outpost_agent_forget_credential();
            esp_restart();
        }
        vTaskDelay(pdMS_TO_TICKS(err == OUTPOST_ERR_NO_CREDENTIAL ? 2000 : 10000));
    }
}

esp_err_t outpost_agent_start(const outpost_agent_config_t *config)
{
    BaseType_t ok = xTaskCreate(agent_task, "outpost_agent", AGENT_STACK, (void *)config, 5, NULL);
    return ok == pdPASS ? ESP_OK : ESP_ERR_NO_MEM;
}
