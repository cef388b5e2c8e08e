//! `rsmsg info`: which transports are usable here, and the RDMA devices, ports and GID tables,
//! like a short `ibv_devinfo -v`.

use std::process::ExitCode;

use anyhow::Context as _;
use rsmsg::verbs::{
    CompletionQueue, Context, Device, DeviceAttr, PortAttr, ProtectionDomain, QpConfig, QueuePair,
    VerbsError, devices,
};
use serde::Serialize;

/// Arguments of `rsmsg info`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Only this device (default: all).
    #[arg(short = 'd', long, env = "RSMSG_DEVICE")]
    device: Option<String>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize)]
struct DeviceInfo {
    name: String,
    node_guid: String,
    sys_image_guid: String,
    fw_ver: String,
    vendor_id: u32,
    vendor_part_id: u32,
    max_qp: u32,
    max_qp_wr: u32,
    max_sge: u32,
    max_cqe: u32,
    max_mr: u32,
    max_qp_rd_atom: u32,
    /// Granted `max_inline_data` of a probe RC QP, if one could be created.
    max_inline: Option<u32>,
    ports: Vec<PortInfo>,
}

#[derive(Debug, Serialize)]
struct PortInfo {
    port: u8,
    state: String,
    link_layer: String,
    active_mtu: Option<u32>,
    max_mtu: Option<u32>,
    lid: u16,
    gid_tbl_len: u32,
    gids: Vec<GidInfo>,
    error: Option<String>,
}

#[derive(Debug, Serialize)]
struct GidInfo {
    index: u8,
    gid: String,
    #[serde(rename = "type")]
    gid_type: String,
}

fn guid_str(g: u64) -> String {
    let b = g.to_be_bytes();
    format!(
        "{:02x}{:02x}:{:02x}{:02x}:{:02x}{:02x}:{:02x}{:02x}",
        b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]
    )
}

/// Largest inline size a provider grants: create throw-away RC QPs asking for decreasing sizes.
fn probe_max_inline(ctx: &Context) -> Option<u32> {
    let pd = ProtectionDomain::new(ctx).ok()?;
    let cq = CompletionQueue::new(ctx, 4, None).ok()?;
    [1024u32, 512, 256, 128, 64, 0]
        .into_iter()
        .find_map(|want| {
            let cfg = QpConfig {
                max_send_wr: 1,
                max_recv_wr: 1,
                max_inline_data: want,
                ..QpConfig::default()
            };
            QueuePair::new(&pd, &cq, &cq, &cfg)
                .ok()
                .map(|qp| qp.caps().max_inline_data)
        })
}

fn port_info(ctx: &Context, port: u8, pa: Result<PortAttr, VerbsError>) -> PortInfo {
    match pa {
        Ok(pa) => {
            let (gids, error) = match ctx.gid_table(port) {
                Ok(t) => (
                    t.iter()
                        .map(|e| GidInfo {
                            index: e.index.0,
                            gid: e.gid.to_string(),
                            gid_type: e.gid_type.to_string(),
                        })
                        .collect(),
                    None,
                ),
                Err(e) => (Vec::new(), Some(format!("{e:#}"))),
            };
            PortInfo {
                port,
                state: pa.state.to_string(),
                link_layer: pa.link_layer.to_string(),
                active_mtu: pa.active_mtu.map(|m| m.bytes()),
                max_mtu: pa.max_mtu.map(|m| m.bytes()),
                lid: pa.lid,
                gid_tbl_len: pa.gid_tbl_len,
                gids,
                error,
            }
        }
        Err(e) => PortInfo {
            port,
            state: "?".into(),
            link_layer: "?".into(),
            active_mtu: None,
            max_mtu: None,
            lid: 0,
            gid_tbl_len: 0,
            gids: Vec::new(),
            error: Some(anyhow::Error::from(e).to_string()),
        },
    }
}

fn device_info(dev: &Device) -> anyhow::Result<DeviceInfo> {
    let name = dev.name();
    let ctx = dev.open().with_context(|| format!("opening {name}"))?;
    let a: DeviceAttr = ctx
        .query_device()
        .with_context(|| format!("querying {name}"))?;
    let ports = (1..=a.phys_port_cnt)
        .map(|p| port_info(&ctx, p, ctx.query_port(p)))
        .collect();
    Ok(DeviceInfo {
        name,
        node_guid: guid_str(a.node_guid),
        sys_image_guid: guid_str(a.sys_image_guid),
        fw_ver: a.fw_ver,
        vendor_id: a.vendor_id,
        vendor_part_id: a.vendor_part_id,
        max_qp: a.max_qp,
        max_qp_wr: a.max_qp_wr,
        max_sge: a.max_sge,
        max_cqe: a.max_cqe,
        max_mr: a.max_mr,
        max_qp_rd_atom: a.max_qp_rd_atom,
        max_inline: probe_max_inline(&ctx),
        ports,
    })
}

fn print_text(infos: &[DeviceInfo]) -> std::io::Result<()> {
    for d in infos {
        outln!("{}", d.name)?;
        outln!("  node_guid       {}", d.node_guid)?;
        outln!(
            "  fw_ver          {}",
            if d.fw_ver.is_empty() { "-" } else { &d.fw_ver }
        )?;
        outln!("  vendor          {:#x}:{}", d.vendor_id, d.vendor_part_id)?;
        outln!(
            "  max_qp_wr       {}   max_sge {}   max_cqe {}   max_qp_rd_atom {}",
            d.max_qp_wr,
            d.max_sge,
            d.max_cqe,
            d.max_qp_rd_atom
        )?;
        match d.max_inline {
            Some(n) => outln!("  max_inline      {n} (granted to a probe RC QP)")?,
            None => outln!("  max_inline      unknown")?,
        }
        for p in &d.ports {
            let mtu = |m: Option<u32>| m.map_or_else(|| "?".to_string(), |v| v.to_string());
            outln!(
                "  port {}: {}  link_layer {}  active_mtu {} (max {})  lid {}",
                p.port,
                p.state,
                p.link_layer,
                mtu(p.active_mtu),
                mtu(p.max_mtu),
                p.lid
            )?;
            if let Some(e) = &p.error {
                outln!("    error: {e}")?;
            }
            for g in &p.gids {
                outln!("    GID[{:3}] {:<40} {}", g.index, g.gid, g.gid_type)?;
            }
        }
    }
    Ok(())
}

/// Whether one transport can be used on this host, and why not.
#[derive(Debug, Serialize)]
struct Usable {
    usable: bool,
    /// What was checked (when usable) or what is missing (when not).
    reason: String,
}

#[derive(Debug, Serialize)]
struct Transports {
    shm: Usable,
    verbs: Usable,
}

/// The whole report of `rsmsg info --json`.
#[derive(Debug, Serialize)]
struct Report {
    transports: Transports,
    devices: Vec<DeviceInfo>,
    /// Why the device list could not be read, if it could not.
    #[serde(skip_serializing_if = "Option::is_none")]
    devices_error: Option<String>,
}

/// Shared memory needs memfd (the segments) and a writable socket directory (the handshake):
/// probe both by creating a one-page memfd and binding a throw-away endpoint.
fn shm_usable() -> Usable {
    if let Err(e) = rsmsg::shm::ShmRegion::create("rsmsg-info-probe", 4096) {
        return Usable {
            usable: false,
            reason: format!("memfd: {}", chain(&anyhow::Error::from(e))),
        };
    }
    let dir = rsmsg::transport::shm::socket_dir();
    let name = format!("rsmsg-info-probe-{}", std::process::id());
    match rsmsg::transport::shm::ShmListener::bind(
        &name,
        rsmsg::core::Layout::default(),
        Default::default(),
    ) {
        Ok(l) => {
            drop(l);
            Usable {
                usable: true,
                reason: format!(
                    "memfd works; socket directory {} is writable",
                    dir.display()
                ),
            }
        }
        Err(e) => Usable {
            usable: false,
            reason: format!(
                "socket directory {} (set RSMSG_SHM_DIR): {}",
                dir.display(),
                chain(&anyhow::Error::from(e))
            ),
        },
    }
}

/// Verbs needs a device with at least one ACTIVE port.
fn verbs_usable(infos: &[DeviceInfo], list_error: Option<&str>) -> Usable {
    if let Some(e) = list_error {
        return Usable {
            usable: false,
            reason: format!("no RDMA devices: {e}"),
        };
    }
    if infos.is_empty() {
        return Usable {
            usable: false,
            reason: "no RDMA devices".into(),
        };
    }
    let active: Vec<String> = infos
        .iter()
        .flat_map(|d| {
            d.ports
                .iter()
                .filter(|p| p.state == "PORT_ACTIVE")
                .map(move |p| format!("{} port {}", d.name, p.port))
        })
        .collect();
    if active.is_empty() {
        Usable {
            usable: false,
            reason: "no device has an ACTIVE port".into(),
        }
    } else {
        Usable {
            usable: true,
            reason: format!("ACTIVE: {}", active.join(", ")),
        }
    }
}

fn chain(e: &anyhow::Error) -> String {
    e.chain()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(": ")
}

fn print_transports(t: &Transports) -> std::io::Result<()> {
    outln!("transports")?;
    for (name, u) in [("shm", &t.shm), ("verbs", &t.verbs)] {
        outln!(
            "  {name:<6} {:<10} {}",
            if u.usable { "usable" } else { "unusable" },
            u.reason
        )?;
    }
    Ok(())
}

/// Run `rsmsg info`. Without RDMA devices it still reports the transports and succeeds; an
/// unknown `--device` is an error.
pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let (devs, list_error) = match devices() {
        Ok(d) => (d, None),
        Err(e) => (Vec::new(), Some(chain(&anyhow::Error::from(e)))),
    };
    tracing::debug!(count = devs.len(), error = ?list_error, "RDMA device list");
    let selected: Vec<&Device> = match &args.device {
        Some(n) => devs.iter().filter(|d| &d.name() == n).collect(),
        None => devs.iter().collect(),
    };
    if let (Some(n), true) = (&args.device, selected.is_empty()) {
        let names: Vec<String> = devs.iter().map(Device::name).collect();
        eprintln!(
            "rsmsg info: no RDMA device named {n:?} (present: {})",
            if names.is_empty() {
                "none".to_string()
            } else {
                names.join(", ")
            }
        );
        return Ok(ExitCode::FAILURE);
    }
    let infos = selected
        .into_iter()
        .map(device_info)
        .collect::<anyhow::Result<Vec<_>>>()?;
    let report = Report {
        transports: Transports {
            shm: shm_usable(),
            verbs: verbs_usable(&infos, list_error.as_deref()),
        },
        devices: infos,
        devices_error: list_error,
    };
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&report)?)?;
    } else {
        print_transports(&report.transports)?;
        if report.devices.is_empty() {
            outln!(
                "no RDMA devices{}",
                report
                    .devices_error
                    .as_deref()
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default()
            )?;
        }
        print_text(&report.devices)?;
    }
    Ok(ExitCode::SUCCESS)
}
