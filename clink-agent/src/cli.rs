//! `clink`: certificates, and the agent's objects through its admin socket.

use std::{
    collections::BTreeMap,
    io::Read as _,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context as _, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use hyper::Method;
use serde_json::{json, Value};

use crate::{
    admin::{self, Client},
    api::{self, Kind, Object, API_VERSION, DEFAULT_NAMESPACE},
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
    /// The sockmap data path's eBPF programs, where they are attached, and their maps (service
    /// table, socket pairs, counters), each with the matching bpftool command. Needs root.
    Bpf {
        /// The agent's --bpf-pin-dir.
        #[arg(long, value_name = "DIR", default_value = crate::ebpf::DEFAULT_PIN_DIR)]
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
        #[arg(long, default_value = "round-robin")]
        lb_scheme: String,
        #[command(flatten)]
        ns: NamespaceArg,
    },
    /// An access policy; without --from/--to it applies to all traffic.
    Policy {
        name: String,
        #[arg(long, value_parser = ["allow", "deny"])]
        action: String,
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
            apply(&client, objects).await?;
        }
        Command::Get {
            kind,
            name,
            ns,
            all_namespaces,
            output,
        } => {
            let kind = parse_kind(&kind)?;
            let mut uri = format!("/v1/objects/{kind}?");
            if !all_namespaces {
                uri.push_str(&format!("namespace={}&", ns.namespace));
            }
            if let Some(name) = &name {
                uri.push_str(&format!("name={name}"));
            }
            let items = client.call(Method::GET, &uri, None).await?;
            let items = items.as_array().cloned().unwrap_or_default();
            match (output, &name) {
                (Some(Output::Json), Some(_)) => println!("{:#}", items[0]),
                (Some(Output::Json), None) => println!("{:#}", Value::Array(items)),
                (Some(Output::Yaml), _) => {
                    for (i, item) in items.iter().enumerate() {
                        if i > 0 {
                            println!("---");
                        }
                        print!("{}", yaml_serde::to_string(item)?);
                    }
                }
                (None, _) => print_table(kind, &items),
            }
        }
        Command::Delete { kind, name, ns } => {
            let kind = parse_kind(&kind)?;
            let ns = if kind.namespaced() {
                ns.namespace.as_str()
            } else {
                "_"
            };
            let answer = client
                .call(
                    Method::DELETE,
                    &format!("/v1/objects/{kind}/{ns}/{name}"),
                    None,
                )
                .await?;
            println!("{} deleted", answer["deleted"].as_str().unwrap_or(&name));
        }
        Command::Create { what } => {
            let object = build(what)?;
            let object = Object::from_value(object)?;
            apply(&client, vec![object]).await?;
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
            print!("{}", crate::sockmap::report(&bpf_pin_dir, json)?);
        }
        Command::Status { output } => {
            let status = client.call(Method::GET, "/v1/status", None).await?;
            match output {
                Some(Output::Json) => println!("{status:#}"),
                Some(Output::Yaml) => print!("{}", yaml_serde::to_string(&status)?),
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

async fn apply(client: &Client, objects: Vec<Object>) -> Result<()> {
    let body = Value::Array(objects.iter().map(Object::to_json).collect());
    let answer = client.call(Method::POST, "/v1/apply", Some(body)).await?;
    for r in answer["results"].as_array().into_iter().flatten() {
        println!(
            "{} {}",
            r["object"].as_str().unwrap_or("?"),
            r["change"].as_str().unwrap_or("?")
        );
    }
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

fn selector(pairs: &[String], flag: &str) -> Result<Value> {
    let mut labels = BTreeMap::new();
    for pair in pairs {
        let (k, v) = pair
            .split_once('=')
            .with_context(|| format!("--{flag} {pair:?}: expected KEY=VALUE"))?;
        labels.insert(k.to_owned(), v.to_owned());
    }
    Ok(if labels.is_empty() {
        json!([{ "workloadSelector": {} }])
    } else {
        json!([{ "workloadSelector": { "matchLabels": labels } }])
    })
}

fn build(what: CreateCommand) -> Result<Value> {
    let object = |kind: &str, name: &str, ns: Option<&str>, spec: Value| {
        let mut metadata = json!({ "name": name });
        if let Some(ns) = ns {
            metadata["namespace"] = json!(ns);
        }
        json!({ "apiVersion": API_VERSION, "kind": kind, "metadata": metadata, "spec": spec })
    };
    Ok(match what {
        CreateCommand::Peer {
            name,
            host,
            port,
            ns,
        } => object(
            "Peer",
            &name,
            Some(&ns.namespace),
            json!({ "gateways": [{ "host": host, "port": port }] }),
        ),
        CreateCommand::Export {
            name,
            host,
            port,
            ns,
        } => object(
            "Export",
            &name,
            Some(&ns.namespace),
            json!({ "host": host, "port": port }),
        ),
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
            let mut spec = json!({
                "port": port,
                "sources": [{
                    "peer": peer,
                    "exportName": export_name.unwrap_or_else(|| name.clone()),
                    "exportNamespace": export_namespace.unwrap_or_else(|| ns.namespace.clone()),
                }],
                "lbScheme": lb_scheme,
            });
            if let Some(t) = target_port {
                spec["targetPort"] = json!(t);
            }
            object("Import", &name, Some(&ns.namespace), spec)
        }
        CreateCommand::Policy {
            name,
            action,
            privileged,
            from,
            to,
            ns,
        } => {
            let spec = json!({
                "action": action,
                "from": selector(&from, "from")?,
                "to": selector(&to, "to")?,
            });
            if privileged {
                object("PrivilegedAccessPolicy", &name, None, spec)
            } else {
                object("AccessPolicy", &name, Some(&ns.namespace), spec)
            }
        }
    })
}

fn summary(kind: Kind, item: &Value) -> String {
    let spec = &item["spec"];
    match kind {
        Kind::Peer => spec["gateways"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|g| format!("{}:{}", g["host"].as_str().unwrap_or("?"), g["port"]))
            .collect::<Vec<_>>()
            .join(","),
        Kind::Export => format!("{}:{}", spec["host"].as_str().unwrap_or(""), spec["port"]),
        Kind::Import => {
            let port = match spec["targetPort"].as_u64() {
                Some(t) => format!("{}->{t}", spec["port"]),
                None => spec["port"].to_string(),
            };
            let sources = spec["sources"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|s| {
                    format!(
                        "{}/{}@{}",
                        s["exportNamespace"].as_str().unwrap_or("?"),
                        s["exportName"].as_str().unwrap_or("?"),
                        s["peer"].as_str().unwrap_or("?")
                    )
                })
                .collect::<Vec<_>>()
                .join(",");
            format!("port {port}  sources {sources}")
        }
        Kind::AccessPolicy | Kind::PrivilegedAccessPolicy => {
            spec["action"].as_str().unwrap_or("?").to_owned()
        }
    }
}

fn print_table(kind: Kind, items: &[Value]) {
    if items.is_empty() {
        println!("No {kind} objects found.");
        return;
    }
    let rows: Vec<[String; 3]> = items
        .iter()
        .map(|item| {
            [
                item["metadata"]["namespace"]
                    .as_str()
                    .unwrap_or("")
                    .to_owned(),
                item["metadata"]["name"].as_str().unwrap_or("").to_owned(),
                summary(kind, item),
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

fn print_status(s: &Value) {
    println!("agent:      {}", s["name"].as_str().unwrap_or("?"));
    println!("version:    {}", s["version"].as_str().unwrap_or("?"));
    println!("gateway:    {}", s["gateway"].as_str().unwrap_or("?"));
    println!("data path:  {}", s["datapath"].as_str().unwrap_or("?"));
    println!("uptime:     {}s", s["uptimeSeconds"]);
    let objects = s["objects"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ");
    println!("objects:    {objects}");
    for p in s["peers"].as_array().into_iter().flatten() {
        let labels = p["labels"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
            .collect::<Vec<_>>()
            .join(",");
        println!(
            "peer:       {} reachable={} labels={}",
            p["name"].as_str().unwrap_or("?"),
            p["reachable"].as_str().unwrap_or("?"),
            if labels.is_empty() { "-" } else { &labels }
        );
    }
    for i in s["imports"].as_array().into_iter().flatten() {
        println!(
            "import:     {} listening on port {}",
            i["import"].as_str().unwrap_or("?"),
            i["port"]
        );
    }
    let c = &s["connections"];
    println!(
        "connections: {} active, {} opened, {} failed; {} bytes out, {} bytes in",
        c["active"], c["opened"], c["failed"], c["bytes_out"], c["bytes_in"]
    );
}
