//! `hub-sim`: a local stand-in for Azure IoT Hub and its Device Provisioning Service
//! (DPS), for tests and demos of Outpost's `azure-iot` uplink profile without Azure.
//!
//! It speaks their MQTT surface over TLS on port 8883 as Microsoft's device SDKs expect
//! (they connect to port 8883 only, so each listener takes its own loopback address,
//! `auto` picking a free one in 127.0.0.0/8):
//!
//! * **DPS** (`--dps`): symmetric-key attestation with SAS tokens checked against
//!   individual enrollments and enrollment groups (member keys derived per registration
//!   id), `iotdps-register` answered 202 with `retry-after` and then assigned on
//!   `iotdps-get-operationstatus`; reprovisioning policies (migrate, reset, never) when the
//!   operator moves an enrollment to another hub; `--throttle N` answers 429 first.
//! * **IoT Hubs** (`--hub`, repeatable): the device registry DPS fills (or `--device`),
//!   SAS-checked CONNECT (`{hub}/{deviceId}/?api-version=…`, the model id recorded),
//!   telemetry with its property bag, twins (GET, reported PATCH with IoT Hub's limits and
//!   `$version`s, desired patches), direct methods and cloud-to-device messages.
//!
//! It writes its CA certificate (PEM) to `--ca-out` for clients to trust. Operator
//! commands are JSON lines on stdin (`desired`, `deploy` and `cancel-deployment` for Device
//! Update's service, `method`, `c2d`, `twin`, `reassign`, `disable`, `enable`, `kick`,
//! `stats`); every event is a JSON line on stdout.

mod broker;
mod cloud;

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use serde_json::{Value, json};
use tokio::io::AsyncBufReadExt;
use tokio::net::TcpListener;

use crate::broker::Broker;
use crate::cloud::{Cloud, DPS, Enrollment, Policy, Setup};

#[derive(Debug, Parser)]
#[command(
    name = "hub-sim",
    about = "A local stand-in for Azure IoT Hub and DPS over MQTT"
)]
struct Args {
    /// DPS's address (`IP[:port]`, port 8883 unless given), or `auto`: a free loopback
    /// address at port 8883.
    #[arg(long, default_value = "auto")]
    dps: String,
    /// A hub's address, as for --dps; its host name is the IP (repeat for several hubs;
    /// the first is where enrollments assign unless they say otherwise).
    #[arg(long = "hub", default_values_t = ["auto".to_owned()])]
    hubs: Vec<String>,
    /// DPS's id scope.
    #[arg(long, default_value = "0ne00000A1B")]
    id_scope: String,
    /// An individual enrollment: `registrationId:base64key[:hubIndex[:migrate|reset|never]]`.
    #[arg(long = "enrollment", value_name = "ID:KEY[:HUB[:POLICY]]")]
    enrollments: Vec<String>,
    /// An enrollment group: `name:base64groupKey[:hubIndex[:policy]]`; any registration id
    /// whose token is signed with the key derived from the group's may register.
    #[arg(long = "group", value_name = "NAME:KEY[:HUB[:POLICY]]")]
    groups: Vec<String>,
    /// A device registered at the first hub directly: `deviceId:base64key`.
    #[arg(long = "device", value_name = "ID:KEY")]
    devices: Vec<String>,
    /// An individual enrollment with X.509 attestation: `registrationId[:hubIndex[:policy]]`;
    /// the device presents a client certificate whose CN is the registration id, issued
    /// by --client-ca.
    #[arg(long = "x509-enrollment", value_name = "ID[:HUB[:POLICY]]")]
    x509_enrollments: Vec<String>,
    /// A device registered at the first hub directly with X.509 (CA-signed)
    /// authentication: its client certificate's CN is the device id.
    #[arg(long = "x509-device", value_name = "ID")]
    x509_devices: Vec<String>,
    /// The CA (PEM) whose certificates authenticate X.509 devices; without it no client
    /// certificate is asked for.
    #[arg(long)]
    client_ca: Option<PathBuf>,
    /// The initial twin's desired properties (JSON) of every device DPS creates.
    #[arg(long, default_value = "{}")]
    initial_twin: String,
    /// Answer the first N DPS requests with 429 (retry-after 1).
    #[arg(long, default_value_t = 0)]
    throttle: u32,
    /// The `retry-after` (seconds) DPS gives with 202 assigning.
    #[arg(long, default_value_t = 1)]
    retry_after: u32,
    /// Where to write the CA certificate (PEM) that clients trust.
    #[arg(long)]
    ca_out: PathBuf,
}

/// Prints one event line.
pub fn emit(event: &Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{event}");
    let _ = out.flush();
}

/// The port Microsoft's SDKs connect to.
const MQTTS_PORT: u16 = 8883;

async fn bind(spec: &str) -> anyhow::Result<TcpListener> {
    if spec == "auto" {
        let mut seed = [0u8; 64];
        getrandom::fill(&mut seed).context("the OS's random source")?;
        for chunk in seed.chunks_exact(3) {
            let [a, b, c] = [chunk[0], chunk[1], chunk[2]];
            // 127.x.y.z with z not 0 or 255, away from 127.0.0.1.
            let ip = Ipv4Addr::new(127, a.max(1), b, c.clamp(1, 254));
            if let Ok(listener) = TcpListener::bind((ip, MQTTS_PORT)).await {
                return Ok(listener);
            }
        }
        bail!("no free loopback address with port {MQTTS_PORT} after 21 tries");
    }
    let addr: SocketAddr = match spec.parse::<IpAddr>() {
        Ok(ip) => SocketAddr::new(ip, MQTTS_PORT),
        Err(_) => spec
            .parse()
            .with_context(|| format!("{spec:?} is not IP[:port] or auto"))?,
    };
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))
}

fn enrollment(spec: &str, group: bool, hubs: usize) -> anyhow::Result<Enrollment> {
    let mut parts = spec.split(':');
    let (Some(name), Some(key)) = (parts.next(), parts.next()) else {
        bail!("{spec:?} is not NAME:KEY[:HUB[:POLICY]]");
    };
    let hub = match parts.next() {
        Some(index) => index
            .parse::<usize>()
            .ok()
            .filter(|i| *i < hubs)
            .with_context(|| format!("{spec:?}: the hub index must be below {hubs}"))?,
        None => 0,
    };
    let policy = match parts.next() {
        Some(policy) => policy.parse::<Policy>()?,
        None => Policy::Migrate,
    };
    outpost_azure::sas::sign(key, "")
        .with_context(|| format!("{spec:?}: the key is not base64"))?;
    Ok(Enrollment {
        name: name.to_owned(),
        key: key.to_owned(),
        group,
        hub,
        policy,
    })
}

/// A CA and a server certificate for every listener's address (and `localhost`); with
/// `client_ca` (PEM), client certificates it issued are asked for (not required: keys
/// and certificates share the listeners, as at IoT Hub).
fn tls(ips: &[IpAddr], client_ca: Option<&[u8]>) -> anyhow::Result<(String, rustls::ServerConfig)> {
    let ca_key = rcgen::KeyPair::generate()?;
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "hub-sim test CA");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()])?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "hub-sim");
    params
        .subject_alt_names
        .extend(ips.iter().map(|ip| rcgen::SanType::IpAddress(*ip)));
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let cert = params.signed_by(&key, &issuer)?;
    let chain = vec![cert.der().clone(), ca_cert.der().clone()];
    let private = rustls_pki_types::PrivateKeyDer::try_from(key.serialize_der())
        .map_err(|err| anyhow::anyhow!("the server key: {err}"))?;
    // TLS 1.2 and 1.3: Microsoft's Python SDK asks for TLS 1.2 exactly.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(pem) => {
            use rustls_pki_types::pem::PemObject as _;
            let mut roots = rustls::RootCertStore::empty();
            for cert in rustls_pki_types::CertificateDer::pem_slice_iter(pem) {
                roots.add(cert.context("--client-ca is not PEM certificates")?)?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .allow_unauthenticated()
            .build()?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config = builder.with_single_cert(chain, private)?;
    Ok((ca_cert.pem(), config))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let args = Args::parse();
    let initial_twin: Value =
        serde_json::from_str(&args.initial_twin).context("--initial-twin is not JSON")?;
    if !initial_twin.is_object() {
        bail!("--initial-twin must be a JSON object");
    }
    let mut enrollments = Vec::new();
    for spec in &args.enrollments {
        enrollments.push(enrollment(spec, false, args.hubs.len())?);
    }
    for spec in &args.groups {
        enrollments.push(enrollment(spec, true, args.hubs.len())?);
    }
    for spec in &args.x509_enrollments {
        let (id, rest) = spec
            .split_once(':')
            .map_or((spec.as_str(), None), |(a, b)| (a, Some(b)));
        let mut enrollment = enrollment(
            &format!(
                "{id}:AAAA{}",
                rest.map(|r| format!(":{r}")).unwrap_or_default()
            ),
            false,
            args.hubs.len(),
        )?;
        enrollment.key = cloud::X509.to_owned();
        enrollments.push(enrollment);
    }
    let mut devices = Vec::new();
    for spec in &args.devices {
        let (id, key) = spec
            .split_once(':')
            .with_context(|| format!("--device {spec:?} is not ID:KEY"))?;
        devices.push((id.to_owned(), key.to_owned()));
    }
    for id in &args.x509_devices {
        devices.push((id.clone(), cloud::X509.to_owned()));
    }
    if (!args.x509_enrollments.is_empty() || !args.x509_devices.is_empty())
        && args.client_ca.is_none()
    {
        bail!("X.509 devices need --client-ca (the CA that issues their certificates)");
    }

    let dps = bind(&args.dps).await?;
    let mut hubs = Vec::new();
    for spec in &args.hubs {
        hubs.push(bind(spec).await?);
    }
    let mut ips = vec![dps.local_addr()?.ip()];
    ips.extend(
        hubs.iter()
            .map(|hub| hub.local_addr().map(|a| a.ip()))
            .collect::<Result<Vec<_>, _>>()?,
    );
    let client_ca = match &args.client_ca {
        Some(path) => {
            Some(std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?)
        }
        None => None,
    };
    let (ca, config) = tls(&ips, client_ca.as_deref())?;
    std::fs::write(&args.ca_out, &ca)
        .with_context(|| format!("cannot write {}", args.ca_out.display()))?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let hub_names: Vec<String> = ips[1..].iter().map(IpAddr::to_string).collect();

    let broker = Arc::new(Broker::default());
    let setup = Setup {
        id_scope: args.id_scope.clone(),
        hubs: hub_names.clone(),
        enrollments,
        devices,
        initial_twin,
        throttle: args.throttle,
        retry_after: args.retry_after,
    };
    let cloud = Arc::new(Cloud::new(setup, broker.clone()));
    let dps_addr = dps.local_addr()?;
    tokio::spawn(
        broker
            .clone()
            .serve(cloud.clone(), DPS, dps, acceptor.clone()),
    );
    let mut hub_addrs = Vec::new();
    for (index, hub) in hubs.into_iter().enumerate() {
        hub_addrs.push(hub.local_addr()?.to_string());
        tokio::spawn(
            broker
                .clone()
                .serve(cloud.clone(), index + 1, hub, acceptor.clone()),
        );
    }
    emit(&json!({
        "event": "ready",
        "id_scope": args.id_scope,
        "dps": dps_addr.ip().to_string(),
        "dps_addr": dps_addr.to_string(),
        "hubs": hub_names,
        "hub_addrs": hub_addrs,
        "ca": args.ca_out,
    }));

    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut stdin_open = true;
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            line = lines.next_line(), if stdin_open => match line {
                Ok(Some(line)) if line.trim().is_empty() => {}
                Ok(Some(line)) => match operator(&cloud, &line) {
                    Ok(event) => emit(&event),
                    Err(err) => emit(&json!({"event": "error", "command": line, "error": format!("{err:#}")})),
                },
                // stdin closed: keep serving until a signal.
                _ => stdin_open = false,
            },
            _ = tokio::signal::ctrl_c() => break,
            _ = terminate.recv() => break,
        }
    }
    Ok(())
}

/// One operator command (a JSON object with `op`).
fn operator(cloud: &Arc<Cloud>, line: &str) -> anyhow::Result<Value> {
    let command: Value = serde_json::from_str(line).context("a command is a JSON object")?;
    let text = |name: &str| {
        command[name]
            .as_str()
            .map(str::to_owned)
            .with_context(|| format!("the command needs `{name}` (a string)"))
    };
    match command["op"].as_str().unwrap_or_default() {
        "desired" => cloud.desired(&text("device")?, &command["patch"]),
        "method" => {
            let timeout = command["timeout_secs"].as_u64().unwrap_or(30);
            cloud.method(
                &text("device")?,
                &text("name")?,
                &command["payload"],
                Duration::from_secs(timeout),
            )
        }
        "c2d" => cloud.c2d(
            &text("device")?,
            &command["payload"],
            &command["properties"],
        ),
        // Device Update's service: a deployment (action 3) or a cancel (255) in the
        // device's `deviceUpdate` component, as a desired-property patch.
        "deploy" => {
            let deployment: outpost_azure::adu::AduDeployment =
                serde_json::from_value(command["deployment"].clone()).context(
                    "deploy needs `deployment` {updateManifest, updateManifestSignature, fileUrls}",
                )?;
            let mut service = serde_json::to_value(&deployment)?;
            service["workflow"] = serde_json::json!({
                "action": outpost_azure::adu::ACTION_PROCESS_DEPLOYMENT,
                "id": text("workflow")?,
            });
            let patch = serde_json::json!({ outpost_azure::adu::COMPONENT: {
                "__t": "c", "service": service } });
            cloud.desired(&text("device")?, &patch)
        }
        "cancel-deployment" => {
            let patch = serde_json::json!({ outpost_azure::adu::COMPONENT: { "__t": "c",
                "service": {
                    "workflow": { "action": outpost_azure::adu::ACTION_CANCEL,
                                  "id": outpost_azure::adu::NO_DEPLOYMENT },
                    "updateManifest": null, "updateManifestSignature": null, "fileUrls": null,
                } } });
            cloud.desired(&text("device")?, &patch)
        }
        "twin" => cloud.twin(&text("device")?),
        "reassign" => cloud.reassign(&text("enrollment")?, &text("hub")?),
        "disable" => cloud.set_enabled(&text("device")?, false),
        "enable" => cloud.set_enabled(&text("device")?, true),
        "kick" => cloud.kick(&text("device")?),
        "stats" => Ok(cloud.stats()),
        other => bail!(
            "unknown op {other:?} (desired, deploy, cancel-deployment, method, c2d, twin, \
             reassign, disable, enable, kick, stats)"
        ),
    }
}
