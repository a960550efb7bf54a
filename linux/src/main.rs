//! `sluice`: one binary for every role on Linux.

mod access;
mod agent;
mod ca;
mod cert_watch;
mod connector;
mod dns;
mod instance;
mod lab;
mod lab_nat;
mod logging;
mod metrics;
mod node;
mod ops;
mod policy_cmd;
mod registry_etcd;
mod relay;
mod remote_dns;
mod resolvconf;
mod revocations;
mod status;
mod tun;
mod udp_batch;

// The configuration files are parsed in the library (linux/src/lib.rs), which the fuzz targets
// share.
use sluice::config;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "sluice",
    version,
    about = "Sluice zero-trust network access: relay, connector, agent, CA and lab"
)]
struct Cli {
    /// How log lines look on standard error: `text` for people, `json` (one object per line)
    /// for log collectors. `RUST_LOG` sets the level (`debug`, `sluice=debug,quiche=info`).
    #[arg(long, global = true, value_enum, default_value_t = logging::Format::Text)]
    log_format: logging::Format,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the relay: control connections, address discovery, registry, opaque forwarding.
    Relay(RelayArgs),
    /// Run a connector beside private services: accepts tunnels and dials the services.
    Connector(ConnectorArgs),
    /// Run the agent: a TUN device whose resource traffic goes through tunnels to connectors.
    Agent(AgentArgs),
    /// Show a running agent's tunnels: path (direct or relay), RTT, bytes each way.
    Status(status::StatusArgs),
    /// Give the system back what an agent that was killed left changed (its resolv.conf);
    /// the agent's systemd unit runs this when it stops. Safe to run any time.
    Cleanup,
    /// Create the organisation CA and issue node certificates.
    #[command(subcommand)]
    Ca(CaCmd),
    /// Check a policy file, or explain the decision for a flow.
    #[command(subcommand)]
    Policy(PolicyCmd),
    /// A complete Sluice deployment in network namespaces, for demos, tests and benchmarks.
    #[command(subcommand)]
    Lab(LabCmd),
}

#[derive(Subcommand)]
pub enum PolicyCmd {
    /// Validate a policy: prints errors and warnings.
    ///
    /// Exit status: 0 valid (warnings allowed), 1 invalid, 2 the file cannot be read or the
    /// command line is wrong.
    Check {
        /// The policy file (YAML).
        file: PathBuf,
    },
    /// Print the decision for one flow and the rule that made it (or the default deny).
    ///
    /// Exit status, for scripts: 0 allowed, 1 denied, 2 usage error or invalid policy (its
    /// errors are printed as by `policy check`).
    Explain {
        /// The policy file (YAML).
        file: PathBuf,
        /// The user (the agent certificate's name).
        #[arg(long)]
        user: String,
        /// A group the user's certificate lists: repeat the flag or separate with commas
        /// (--group eng --group ops, or --group eng,ops).
        #[arg(
            long = "group",
            visible_alias = "groups",
            value_name = "GROUP",
            value_delimiter = ','
        )]
        groups: Vec<String>,
        /// The destination: IP:PORT/PROTO (tcp, udp), [IPV6]:PORT/PROTO, HOST:PORT/PROTO, or
        /// HOST_OR_IP/icmp (ICMP has no port).
        #[arg(long)]
        to: String,
        /// Decide as of this time instead of now, to see rule expiry: a date (2027-01-31,
        /// midnight UTC) or an RFC 3339 time (2027-01-31T12:00:00Z).
        #[arg(long)]
        at: Option<String>,
    },
}

#[derive(Args)]
pub struct IdentityArgs {
    /// Certificate file (PEM); overrides `cert` in the config.
    #[arg(long)]
    pub cert: Option<PathBuf>,
    /// Private key file (PEM); overrides `key` in the config.
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// CA certificate file (PEM); overrides `ca` in the config.
    #[arg(long)]
    pub ca: Option<PathBuf>,
}

#[derive(Args)]
pub struct RelayArgs {
    /// YAML configuration file (see configs/relay.yaml); relative paths in it are taken from
    /// its folder.
    #[arg(long, short)]
    pub config: PathBuf,
    /// UDP address to listen on; overrides `listen` (default 0.0.0.0:4433).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    #[command(flatten)]
    pub identity: IdentityArgs,
}

#[derive(Args)]
pub struct ConnectorArgs {
    /// YAML configuration file (see configs/connector.yaml); relative paths in it are taken
    /// from its folder.
    #[arg(long, short)]
    pub config: PathBuf,
    /// The relay, HOST:PORT (an IP address, or a name resolved on every reconnect); overrides
    /// `relay`.
    #[arg(long)]
    pub relay: Option<config::RelayTarget>,
    /// Local UDP address; overrides `listen` (default 0.0.0.0:0, any port).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Access policy file; overrides `policy`.
    #[arg(long)]
    pub policy: Option<PathBuf>,
    /// Audit log (JSON lines); overrides `audit_log` (default: standard output).
    #[arg(long)]
    pub audit_log: Option<PathBuf>,
    #[command(flatten)]
    pub identity: IdentityArgs,
}

#[derive(Args)]
pub struct AgentArgs {
    /// YAML configuration file (see configs/agent.yaml); relative paths in it are taken from
    /// its folder.
    #[arg(long, short)]
    pub config: PathBuf,
    /// The relay, HOST:PORT (an IP address, or a name resolved on every reconnect); overrides
    /// `relay`.
    #[arg(long)]
    pub relay: Option<config::RelayTarget>,
    /// Local UDP address; overrides `listen` (default 0.0.0.0:0, any port).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// TUN interface name; overrides `tun.name` (default sluice0).
    #[arg(long)]
    pub tun_name: Option<String>,
    /// TUN MTU, at least 1280; overrides `tun.mtu` (default 1280).
    #[arg(long)]
    pub mtu: Option<u16>,
    /// Access policy file; overrides `policy`.
    #[arg(long)]
    pub policy: Option<PathBuf>,
    /// Unix socket for `sluice status`; overrides `status_socket` (default
    /// /run/sluice/agent.sock).
    #[arg(long)]
    pub status_socket: Option<PathBuf>,
    /// Audit log (JSON lines); overrides `audit_log` (default /run/sluice/agent-audit.jsonl).
    #[arg(long)]
    pub audit_log: Option<PathBuf>,
    /// No DNS listener (and the system resolver left alone); sets `dns.listen: false`.
    #[arg(long)]
    pub no_dns: bool,
    /// Keep every tunnel on the relay; sets `direct_paths: false`.
    #[arg(long)]
    pub no_direct: bool,
    #[command(flatten)]
    pub identity: IdentityArgs,
}

#[derive(Subcommand)]
pub enum CaCmd {
    /// Create a new organisation CA (Ed25519): DIR/ca.pem and DIR/ca.key.
    Init {
        /// Directory for the CA files (created if missing).
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// Organisation name written into the CA certificate.
        #[arg(long, default_value = "sluice")]
        org: String,
        /// Validity: a number and a unit s, min, h, d, w, mo (30 days) or y, like 90d or 10y.
        #[arg(long, default_value = "10y")]
        valid: String,
        /// Replace an existing CA in DIR (every certificate it issued stops working).
        #[arg(long)]
        force: bool,
    },
    /// Issue a node certificate signed by the CA: OUT/NAME.pem and OUT/NAME.key (the key mode 0600).
    ///
    /// Existing node files are kept unless --force is given; the CA's own ca.pem and ca.key are
    /// never overwritten.
    Issue {
        /// Directory holding ca.pem and ca.key.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// What the node is: agent, connector or relay.
        #[arg(long)]
        role: String,
        /// The node's name (user or device for agents; connectors are addressed by it). Also
        /// the file name: no '/', no leading dot.
        #[arg(long)]
        name: String,
        /// A group for access policy: repeat the flag or separate with commas
        /// (--group eng --group ops, or --group eng,ops).
        #[arg(
            long = "group",
            visible_alias = "groups",
            value_name = "GROUP",
            value_delimiter = ','
        )]
        groups: Vec<String>,
        /// Validity: a number and a unit s, min, h, d, w, mo (30 days) or y, like 12h, 30d or
        /// 1y (a bare m is refused: minutes or months?).
        #[arg(long, default_value = "30d")]
        valid: String,
        /// Where to write the certificate and key (default: the CA directory).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Replace NAME.pem and NAME.key if they exist: the node's old key is lost and its peer
        /// id changes.
        #[arg(long)]
        force: bool,
    },
    /// Renew a node certificate: the same key, name, role and groups (unless --group is
    /// given), a new validity. A running node picks the new file up without dropping a flow.
    Renew {
        /// Directory holding ca.pem and ca.key.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// The node's name: OUT/NAME.pem and OUT/NAME.key must exist.
        #[arg(long)]
        name: String,
        /// Replace the certificate's groups (repeat the flag or separate with commas).
        #[arg(long = "group", value_name = "GROUP", value_delimiter = ',')]
        groups: Option<Vec<String>>,
        /// Validity from now, as for `ca issue`.
        #[arg(long, default_value = "30d")]
        valid: String,
        /// Where NAME.pem and NAME.key are (default: the CA directory).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Revoke certificates at once: adds names or peer ids to the CA's revocation list, signs
    /// it with a higher sequence number and writes it. Relays and connectors that read the
    /// file apply it within a second and close what it revokes; connectors also learn it from
    /// their relay.
    Revoke {
        /// A node name (every certificate with that name, of any role, is refused until the
        /// name is taken off with --remove) or a peer id (64 hex digits, as `ca show` prints:
        /// every certificate for that key). Several may be given.
        targets: Vec<String>,
        /// Directory holding ca.pem and ca.key.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// The revocation list file (default: DIR/revoked.pem); created if missing.
        #[arg(long)]
        list: Option<PathBuf>,
        /// Take the targets off the list instead.
        #[arg(long)]
        remove: bool,
        /// How long the list is valid; nodes warn once it has expired (and keep enforcing it).
        /// Sign it again before then: `ca revoke --refresh`.
        #[arg(long, default_value = "30d")]
        valid: String,
        /// Sign and write the list again with a new expiry, changing no entry.
        #[arg(long)]
        refresh: bool,
    },
    /// Print what a certificate says: name, role, groups, peer id, expiry. Works on node and
    /// CA certificates, and on revocation lists; exit status 1 when the certificate has
    /// expired, or is revoked by the list given with --revocations.
    Show {
        /// Certificate or revocation list file (PEM).
        cert: PathBuf,
        /// Also say whether this revocation list revokes the certificate. The list's signature
        /// is checked against --ca (default: ca.pem beside the list, if there is one).
        #[arg(long)]
        revocations: Option<PathBuf>,
        /// The CA certificate the revocation list must be signed by.
        #[arg(long)]
        ca: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
pub enum LabCmd {
    /// Build the lab's namespaces and start relay, connector, agent and services in them.
    Up(lab::UpOpts),
    /// Stop everything the lab started and delete its namespaces (safe to run any time).
    Down(lab::LabOpts),
    /// Say what runs where (--json: also the lab agent's tunnels).
    Status(lab::StatusOpts),
    /// Measure each side's NAT in RFC 4787 terms (mapping and filtering behaviour).
    NatProbe(lab_nat::ProbeOpts),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if matches!(
        cli.cmd,
        Cmd::Policy(_) | Cmd::Ca(_) | Cmd::Lab(_) | Cmd::Status(_) | Cmd::Cleanup
    ) {
        // Commands that print: `| head` closing the pipe ends them quietly, as for any Unix
        // tool. The long-running roles keep Rust's default (SIGPIPE ignored), so a write to a
        // closed socket is an error to handle, not a death.
        // SAFETY: setting a signal disposition to the default before any thread starts.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    logging::init(cli.log_format);
    let result = match cli.cmd {
        Cmd::Relay(a) => relay::run(a),
        Cmd::Connector(a) => connector::run(a),
        Cmd::Agent(a) => agent::run(a),
        Cmd::Status(a) => status::run(a),
        Cmd::Cleanup => agent::cleanup(),
        Cmd::Ca(c) => ca::run(c),
        Cmd::Policy(c) => {
            return match policy_cmd::run(c) {
                Ok(code) => code,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::from(2)
                }
            }
        }
        Cmd::Lab(LabCmd::Up(o)) => lab::up(&o),
        Cmd::Lab(LabCmd::Down(o)) => lab::down(&o),
        Cmd::Lab(LabCmd::Status(o)) => lab::status(&o),
        Cmd::Lab(LabCmd::NatProbe(o)) => lab_nat::probe_cmd(&o),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if let Some(c) = e.downcast_ref::<config::ConfigError>() {
                eprintln!("error: {c}");
                return ExitCode::from(2);
            }
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
