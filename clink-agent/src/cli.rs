//! `clink`: certificates, and the agent's objects through its admin socket.

use std::{
    collections::BTreeMap,
    io::Read as _,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context as _, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::{de::IntoDeserializer as _, Serialize};
use serde_json::Value;

use crate::{
    admin::{self, Client, StatusResponse},
    api::{
        self, AccessPolicySpec, Action, Endpoint, ExportSpec, ImportSource, ImportSpec, Kind,
        LabelSelector, LbScheme, Object, ObjectKey, ObjectMeta, PeerSpec, Resource,
        WorkloadSetOrSelector, DEFAULT_NAMESPACE,
    },
    tls,
};

#[derive(Parser, Debug)]
#[command(
    name = "clink",
    version,
    about = "Manage a ClusterLink-rs fabric and its agents"
)]
pub struct Cli {
    /// The agent's admin socket.
    #[arg(long, global = true, env = "CLINK_ADMIN", default_value = admin::DEFAULT_SOCKET)]
    admin: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Fabric certificate authority.
    Fabric {
        #[command(subcommand)]
        command: FabricCommand,
    },
    /// Peer certificates signed by a fabric.
    #[command(name = "peer-cert")]
    PeerCert {
        #[command(subcommand)]
        command: PeerCertCommand,
    },
    /// Create or update objects from YAML (a file, a directory of *.yaml/*.yml, or - for stdin).
    Apply {
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<String>,
    },
    /// List objects, or show one.
    Get {
        /// peer, export, import, accesspolicy, privilegedaccesspolicy (plurals work too).
        kind: String,
        name: Option<String>,
        #[command(flatten)]
        ns: NamespaceArg,
        /// Every namespace.
        #[arg(short = 'A', long)]
        all_namespaces: bool,
        #[arg(short = 'o', long, value_enum)]
        output: Option<Output>,
    },
    /// Delete an object.
    Delete {
        kind: String,
        name: String,
        #[command(flatten)]
        ns: NamespaceArg,
    },
    /// Create an object from flags.
    Create {
        #[command(subcommand)]
        what: CreateCommand,
    },
    /// The agent's state and counters.
    Status {
        #[arg(short = 'o', long, value_enum)]
        output: Option<Output>,
    },
    /// The open tunneled connections and the path each one's payload takes (userspace,
    /// sockmap or ktls).
    Connections {
        #[arg(short = 'o', long, value_enum)]
        output: Option<Output>,
    },
    /// The sockmap data path's eBPF programs, where they are attached, and their maps (service
    /// table, socket pairs, counters), each with the matching bpftool command. Needs root.
    Bpf {
        /// The agent's --bpf-pin-dir.
        #[arg(long, value_name = "DIR", default_value = crate::kernel::pins::DEFAULT_PIN_DIR)]
        bpf_pin_dir: PathBuf,
        /// json, or human terms when not given.
        #[arg(short = 'o', long, value_enum)]
        output: Option<Output>,
    },
}

#[derive(Args, Debug, Clone)]
struct NamespaceArg {
    #[arg(short = 'n', long, default_value = DEFAULT_NAMESPACE)]
    namespace: String,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Output {
    Yaml,
    Json,
}

#[derive(Subcommand, Debug)]
enum FabricCommand {
    /// Make the fabric CA in PATH/NAME/ (ca.pem, ca.key).
    Create {
        #[arg(long)]
        name: String,
        #[arg(long, default_value = ".")]
        path: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum PeerCertCommand {
    /// Make peer NAME's certificate in PATH/NAME/ (cert.pem, key.pem, ca.pem).
    Create {
        #[arg(long)]
        name: String,
        #[arg(long)]
        fabric: String,
        #[arg(long, default_value = ".")]
        path: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum CreateCommand {
    /// A remote peer and its gateway address.
    Peer {
        name: String,
        #[arg(long)]
        host: String,
        #[arg(long, default_value_t = 443)]
        port: u16,
        #[command(flatten)]
        ns: NamespaceArg,
    },
    /// A local service offered to peers.
    Export {
        name: String,
        #[arg(long)]
        host: String,
        #[arg(long)]
        port: u16,
        #[command(flatten)]
        ns: NamespaceArg,
    },
    /// A remote export made reachable on a local port.
    Import {
        name: String,
        #[arg(long)]
        port: u16,
        /// Listen on this port instead of --port.
        #[arg(long)]
        target_port: Option<u16>,
        #[arg(long)]
        peer: String,
        /// The export's name at the peer [default: the import's name].
        #[arg(long)]
        export_name: Option<String>,
        /// The export's namespace at the peer [default: the import's namespace].
        #[arg(long)]
        export_namespace: Option<String>,
        /// round-robin, random or static.
        #[arg(long, default_value = "round-robin", value_parser = from_name::<LbScheme>)]
        lb_scheme: LbScheme,
        #[command(flatten)]
        ns: NamespaceArg,
    },
    /// An access policy; without --from/--to it applies to all traffic.
    Policy {
        name: String,
        /// allow or deny.
        #[arg(long, value_parser = from_name::<Action>)]
        action: Action,
        /// Cluster-wide PrivilegedAccessPolicy instead of a namespaced AccessPolicy.
        #[arg(long)]
        privileged: bool,
        /// Source attribute that must match, KEY=VALUE (repeatable).
        #[arg(long = "from", value_name = "KEY=VALUE")]
        from: Vec<String>,
        /// Destination attribute that must match, KEY=VALUE (repeatable).
        #[arg(long = "to", value_name = "KEY=VALUE")]
        to: Vec<String>,
        #[command(flatten)]
        ns: NamespaceArg,
    },
}

/// A flag value parsed by the name the API gives it (`round-robin`, `deny`).
fn from_name<T: serde::de::DeserializeOwned>(s: &str) -> Result<T, String> {
    T::deserialize(s.into_deserializer()).map_err(|e: serde::de::value::Error| e.to_string())
}

pub fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime needs no resources that can be missing");
    match runtime.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    let client = Client::new(&cli.admin);
    match cli.command {
        Command::Fabric {
            command: FabricCommand::Create { name, path },
        } => {
            let dir = tls::create_fabric(&name, &path)?;
            println!("fabric {name} created in {}", dir.display());
        }
        Command::PeerCert {
            command: PeerCertCommand::Create { name, fabric, path },
        } => {
            let dir = tls::create_peer_cert(&name, &fabric, &path)?;
            println!(
                "certificate for peer {name} (fabric {fabric}) created in {}",
                dir.display()
            );
        }
        Command::Apply { files } => {
            let mut objects = Vec::new();
            for f in &files {
                objects.extend(read_objects(f)?);
            }
            if objects.is_empty() {
                bail!("no objects found in {}", files.join(", "));
            }
            apply(&client, &objects).await?;
        }
        Command::Get {
            kind,
            name,
            ns,
            all_namespaces,
            output,
        } => {
            let kind = parse_kind(&kind)?;
            let namespace = (!all_namespaces).then_some(ns.namespace.as_str());
            let items = client.list(kind, namespace, name.as_deref()).await?;
            match (output, items.first()) {
                // The agent answers "not found" rather than no object for a name.
                (Some(Output::Json), Some(item)) if name.is_some() => print_json(item)?,
                (Some(Output::Json), _) => print_json(&items)?,
                (Some(Output::Yaml), _) => {
                    for (i, item) in items.iter().enumerate() {
                        if i > 0 {
                            println!("---");
                        }
                        print_yaml(item)?;
                    }
                }
                (None, _) => print_table(kind, &items),
            }
        }
        Command::Delete { kind, name, ns } => {
            let kind = parse_kind(&kind)?;
            let key = ObjectKey {
                kind,
                namespace: if kind.namespaced() {
                    ns.namespace
                } else {
                    String::new()
                },
                name,
            };
            let answer = client.delete(&key).await?;
            println!("{} deleted", answer.deleted);
        }
        Command::Create { what } => {
            let object = build(what)?;
            object.validate()?;
            apply(&client, &[object]).await?;
        }
        Command::Bpf {
            bpf_pin_dir,
            output,
        } => {
            let json = match output {
                None => false,
                Some(Output::Json) => true,
                Some(Output::Yaml) => bail!("clink bpf: -o yaml is not supported; use -o json"),
            };
            let connections = client
                .connections()
                .await
                .map(|answer| answer.connections)
                .map_err(|e| e.to_string());
            print!(
                "{}",
                crate::kernel::render::report(&bpf_pin_dir, json, connections)?
            );
        }
        Command::Connections { output } => {
            let answer = client.connections().await?;
            match output {
                Some(Output::Json) => print_json(&answer)?,
                Some(Output::Yaml) => print_yaml(&answer)?,
                None => print_connections(&answer.connections),
            }
        }
        Command::Status { output } => {
            let status = client.status().await?;
            match output {
                Some(Output::Json) => print_json(&status)?,
                Some(Output::Yaml) => print_yaml(&status)?,
                None => print_status(&status),
            }
        }
    }
    Ok(())
}

fn parse_kind(s: &str) -> Result<Kind> {
    Kind::parse(s).with_context(|| {
        format!(
            "unknown kind {s:?} (expected peer, export, import, accesspolicy or \
             privilegedaccesspolicy)"
        )
    })
}

async fn apply(client: &Client, objects: &[Object]) -> Result<()> {
    for r in client.apply(objects).await?.results {
        println!("{} {}", r.object, r.change);
    }
    Ok(())
}

/// Printed through a JSON value, whose maps are sorted: the output's key order is the same
/// for every type and does not follow field declarations.
fn sorted(value: &impl Serialize) -> Result<Value> {
    Ok(serde_json::to_value(value)?)
}

fn print_json(value: &impl Serialize) -> Result<()> {
    println!("{:#}", sorted(value)?);
    Ok(())
}

fn print_yaml(value: &impl Serialize) -> Result<()> {
    print!("{}", yaml_serde::to_string(&sorted(value)?)?);
    Ok(())
}

/// Objects from a file, every *.yaml/*.yml/*.json of a directory (sorted), or stdin (`-`).
fn read_objects(source: &str) -> Result<Vec<Object>> {
    if source == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("reading standard input")?;
        return Ok(api::parse_yaml("<stdin>", &text)?);
    }
    let path = Path::new(source);
    let files = if path.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)
            .with_context(|| format!("reading directory {source}"))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.extension()
                    .is_some_and(|e| e == "yaml" || e == "yml" || e == "json")
            })
            .collect();
        files.sort();
        files
    } else {
        vec![path.to_owned()]
    };
    let mut objects = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("reading {}", file.display()))?;
        objects.extend(api::parse_yaml(&file.display().to_string(), &text)?);
    }
    Ok(objects)
}

fn selector(pairs: &[String], flag: &str) -> Result<Vec<WorkloadSetOrSelector>> {
    let mut match_labels = BTreeMap::new();
    for pair in pairs {
        let (k, v) = pair
            .split_once('=')
            .with_context(|| format!("--{flag} {pair:?}: expected KEY=VALUE"))?;
        match_labels.insert(k.to_owned(), v.to_owned());
    }
    Ok(vec![WorkloadSetOrSelector {
        workload_sets: Vec::new(),
        workload_selector: Some(LabelSelector {
            match_labels,
            match_expressions: Vec::new(),
        }),
    }])
}

fn metadata(name: String, namespace: Option<String>) -> ObjectMeta {
    ObjectMeta {
        name,
        namespace,
        ..ObjectMeta::default()
    }
}

fn build(what: CreateCommand) -> Result<Object> {
    Ok(match what {
        CreateCommand::Peer {
            name,
            host,
            port,
            ns,
        } => Object::Peer(Resource::new(
            Kind::Peer,
            metadata(name, Some(ns.namespace)),
            PeerSpec {
                gateways: vec![Endpoint { host, port }],
            },
        )),
        CreateCommand::Export {
            name,
            host,
            port,
            ns,
        } => Object::Export(Resource::new(
            Kind::Export,
            metadata(name, Some(ns.namespace)),
            ExportSpec { host, port },
        )),
        CreateCommand::Import {
            name,
            port,
            target_port,
            peer,
            export_name,
            export_namespace,
            lb_scheme,
            ns,
        } => {
            let spec = ImportSpec {
                port,
                target_port: target_port.unwrap_or(0),
                sources: vec![ImportSource {
                    peer,
                    export_name: export_name.unwrap_or_else(|| name.clone()),
                    export_namespace: export_namespace.unwrap_or_else(|| ns.namespace.clone()),
                }],
                lb_scheme,
            };
            Object::Import(Resource::new(
                Kind::Import,
                metadata(name, Some(ns.namespace)),
                spec,
            ))
        }
        CreateCommand::Policy {
            name,
            action,
            privileged,
            from,
            to,
            ns,
        } => {
            let spec = AccessPolicySpec {
                action,
                from: selector(&from, "from")?,
                to: selector(&to, "to")?,
            };
            if privileged {
                Object::PrivilegedAccessPolicy(Resource::new(
                    Kind::PrivilegedAccessPolicy,
                    metadata(name, None),
                    spec,
                ))
            } else {
                Object::AccessPolicy(Resource::new(
                    Kind::AccessPolicy,
                    metadata(name, Some(ns.namespace)),
                    spec,
                ))
            }
        }
    })
}

fn summary(object: &Object) -> String {
    match object {
        Object::Peer(p) => p
            .spec
            .gateways
            .iter()
            .map(|g| format!("{}:{}", g.host, g.port))
            .collect::<Vec<_>>()
            .join(","),
        Object::Export(e) => format!("{}:{}", e.spec.host, e.spec.port),
        Object::Import(i) => {
            let port = match i.spec.target_port {
                0 => i.spec.port.to_string(),
                t => format!("{}->{t}", i.spec.port),
            };
            let sources = i
                .spec
                .sources
                .iter()
                .map(|s| format!("{}/{}@{}", s.export_namespace, s.export_name, s.peer))
                .collect::<Vec<_>>()
                .join(",");
            format!("port {port}  sources {sources}")
        }
        Object::AccessPolicy(p) | Object::PrivilegedAccessPolicy(p) => {
            p.spec.action.as_str().to_owned()
        }
    }
}

fn print_table(kind: Kind, items: &[Object]) {
    if items.is_empty() {
        println!("No {kind} objects found.");
        return;
    }
    let rows: Vec<[String; 3]> = items
        .iter()
        .map(|item| {
            let meta = item.metadata();
            [
                meta.namespace.clone().unwrap_or_default(),
                meta.name.clone(),
                summary(item),
            ]
        })
        .collect();
    let w0 = rows.iter().map(|r| r[0].len()).max().unwrap_or(0).max(9);
    let w1 = rows.iter().map(|r| r[1].len()).max().unwrap_or(0).max(4);
    let detail = match kind {
        Kind::Peer => "GATEWAYS",
        Kind::Export => "TARGET",
        Kind::Import => "DETAILS",
        Kind::AccessPolicy | Kind::PrivilegedAccessPolicy => "ACTION",
    };
    println!("{:w0$}  {:w1$}  {detail}", "NAMESPACE", "NAME");
    for [ns, name, s] in rows {
        println!("{ns:w0$}  {name:w1$}  {s}");
    }
}

fn print_status(s: &StatusResponse) {
    println!("agent:      {}", s.name);
    println!("version:    {}", s.version);
    println!("gateway:    {}", s.gateway);
    println!("data path:  {}", s.datapath);
    println!("uptime:     {}s", s.uptime_seconds);
    match s.leader {
        Some(leader) => println!(
            "source:     {} ({})",
            s.objects_from,
            if leader {
                "this agent leads: it writes status and Services"
            } else {
                "another agent writes status and Services"
            }
        ),
        None if !s.objects_from.is_empty() => println!("source:     {}", s.objects_from),
        None => {}
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let left = s.certificate.seconds_left(now);
    let left = if left > 0 {
        format!("{} days left", left / 86_400)
    } else {
        "EXPIRED".to_owned()
    };
    println!("certificate: {} ({left})", s.certificate);
    let objects = s
        .objects
        .iter()
        .map(|(kind, n)| format!("{kind} {n}"))
        .collect::<Vec<_>>()
        .join(", ");
    println!("objects:    {objects}");
    for p in &s.peers {
        let labels = p
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",");
        println!(
            "peer:       {} reachable={} labels={}",
            p.name,
            p.reachable,
            if labels.is_empty() { "-" } else { &labels }
        );
    }
    for i in &s.imports {
        println!("import:     {} listening on port {}", i.import, i.port);
    }
    let c = &s.connections;
    println!(
        "connections: {} active, {} opened, {} failed; {} bytes out, {} bytes in",
        c.active, c.opened, c.failed, c.bytes_out, c.bytes_in
    );
    let paths = s
        .paths
        .iter()
        .map(|(path, n)| format!("{path} {n}"))
        .collect::<Vec<_>>()
        .join(", ");
    println!("open by path: {paths}");
}

fn print_connections(connections: &[crate::connections::ConnectionInfo]) {
    if connections.is_empty() {
        println!("no open connections");
        return;
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    println!(
        "{:<6} {:<8} {:<10} {:<28} {:<16} {:<40} AGE",
        "ID", "DIR", "PATH", "SERVICE", "PEER", "LOCAL END"
    );
    for c in connections {
        println!(
            "{:<6} {:<8} {:<10} {:<28} {:<16} {:<40} {}s",
            c.id,
            c.direction,
            c.path,
            c.service,
            c.peer,
            c.local,
            now.saturating_sub(c.opened_at)
        );
    }
}
