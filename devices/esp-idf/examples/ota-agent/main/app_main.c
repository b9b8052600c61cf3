/*
 * The Outpost agent example: Espressif's Wi-Fi provisioning manager (stock protocomm
 * over BLE, Security 1) with the `outpost-agent` endpoint, so an Outpost gateway
 * onboards the device and hands it its credential in one session; then the agent
 * takes updates from the gateway.
 *
 * A device that has Wi-Fi credentials but no agent credential (a revoked one, say)
 * provisions again.
 */
#include <stdio.h>
#include <string.h>

#include "esp_event.h"
#include "esp_log.h"
#include "esp_mac.h"
#include "esp_netif.h"
#include "esp_wifi.h"
#include "freertos/FreeRTOS.h"
#include "freertos/event_groups.h"
#include "nvs_flash.h"
#include "outpost_agent.h"
#include "outpost_agent_esp.h"
#include "sdkconfig.h"
#include "wifi_provisioning/manager.h"
#include "wifi_provisioning/scheme_ble.h"

static const char *TAG = "ota-agent";
static EventGroupHandle_t events;
#define CONNECTED BIT0

static void on_event(void *arg, esp_event_base_t base, int32_t id, void *data)
{
    (void)arg;
    (void)data;
    if (base == WIFI_PROV_EVENT && id == WIFI_PROV_END) {
        wifi_prov_mgr_deinit();
    } else if (base == WIFI_EVENT && id == WIFI_EVENT_STA_START) {
        esp_wifi_connect();
    } else if (base == WIFI_EVENT && id == WIFI_EVENT_STA_DISCONNECTED) {
        xEventGroupClearBits(events, CONNECTED);
        esp_wifi_connect();
    } else if (base == IP_EVENT && id == IP_EVENT_STA_GOT_IP) {
        xEventGroupSetBits(events, CONNECTED);
    }
}

/* "PROV_" and the last three bytes of the MAC, as Espressif's examples name devices. */
static void service_name(char *out, size_t cap)
{
    uint8_t mac[6];
    esp_read_mac(mac, ESP_MAC_WIFI_STA);
    snprintf(out, cap, "PROV_%02X%02X%02X", mac[3], mac[4], mac[5]);
}

/* What the agent reports about the device (chip, project and secure_version come from
 * the running image). */
static const outpost_agent_config_t agent_config = {
    .manufacturer = "Espressif",
    .model = CONFIG_OUTPOST_MODEL,
    .poll_wait_s = 20,
    .confirm_timeout_ms = 120000,
};

void app_main(void)
{
    esp_err_t err = nvs_flash_init();
    if (err == ESP_ERR_NVS_NO_FREE_PAGES || err == ESP_ERR_NVS_NEW_VERSION_FOUND) {
        ESP_ERROR_CHECK(nvs_flash_erase());
        err = nvs_flash_init();
    }
    ESP_ERROR_CHECK(err);
    ESP_ERROR_CHECK(esp_netif_init());
    ESP_ERROR_CHECK(esp_event_loop_create_default());
    events = xEventGroupCreate();
    ESP_ERROR_CHECK(esp_event_handler_register(WIFI_PROV_EVENT, ESP_EVENT_ANY_ID, on_event, NULL));
    ESP_ERROR_CHECK(esp_event_handler_register(WIFI_EVENT, ESP_EVENT_ANY_ID, on_event, NULL));
    ESP_ERROR_CHECK(esp_event_handler_register(IP_EVENT, IP_EVENT_STA_GOT_IP, on_event, NULL));
    esp_netif_create_default_wifi_sta();
    wifi_init_config_t wifi = WIFI_INIT_CONFIG_DEFAULT();
    ESP_ERROR_CHECK(esp_wifi_init(&wifi));

    wifi_prov_mgr_config_t prov = {
        .scheme = wifi_prov_scheme_ble,
        .scheme_event_handler = WIFI_PROV_SCHEME_BLE_EVENT_HANDLER_FREE_BTDM,
    };
    ESP_ERROR_CHECK(wifi_prov_mgr_init(prov));
    bool provisioned = false;
    ESP_ERROR_CHECK(wifi_prov_mgr_is_provisioned(&provisioned));
    if (!provisioned || !outpost_agent_has_credential()) {
        char name[16];
        service_name(name, sizeof name);
        ESP_LOGI(TAG, "provisioning as %s (Security 1)", name);
        /* proto-ver says "outpost": {"ver": "1.0", "cap": ["agent"]}: the gateway then
         * writes the credential to the endpoint. */
        ESP_ERROR_CHECK(wifi_prov_mgr_set_app_info("outpost", OUTPOST_AGENT_PROTOCOL_VERSION,
                                                   outpost_agent_capabilities, 1));
        ESP_ERROR_CHECK(wifi_prov_mgr_endpoint_create(OUTPOST_AGENT_ENDPOINT));
        ESP_ERROR_CHECK(wifi_prov_mgr_start_provisioning(
            WIFI_PROV_SECURITY_1, (const void *)CONFIG_OUTPOST_POP, name, NULL));
        ESP_ERROR_CHECK(wifi_prov_mgr_endpoint_register(OUTPOST_AGENT_ENDPOINT,
                                                        outpost_agent_protocomm_handler, NULL));
    } else {
        wifi_prov_mgr_deinit();
        ESP_ERROR_CHECK(esp_wifi_set_mode(WIFI_MODE_STA));
        ESP_ERROR_CHECK(esp_wifi_start());
    }
    xEventGroupWaitBits(events, CONNECTED, pdFALSE, pdTRUE, portMAX_DELAY);
    ESP_LOGI(TAG, "on the network; starting the Outpost agent");
    ESP_ERROR_CHECK(outpost_agent_start(&agent_config));
}
