//! `stackroute-controller credentials`: a development CA for standalone deployments, the
//! controller's gRPC serving certificate and per-node (or administrator) client credentials,
//! laid out as the controller's `--grpc-tls-dir` and the agents' `--credentials` expect.
//!
//! ```text
//! DIR/ca.crt, DIR/ca.key           the CA (key 0600; keep it off the nodes)
//! DIR/server/{ca.crt,tls.crt,tls.key}   --grpc-tls-dir of the controller
//! DIR/nodes/NODE/{ca.crt,tls.crt,tls.key}  --credentials of NODE's agent
//! DIR/admin/{ca.crt,tls.crt,tls.key}    --credentials of `stackroute status`
//! ```

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::Context as _;
use stackroute_proto::identity::Caller;

use crate::certs::{self, Ca};
use crate::tls;

/// What to create.
#[derive(Clone, Debug, clap::Subcommand)]
pub enum Action {
    /// Create the CA (unless DIR already has one) and the controller's serving certificate
    /// (localhost, 127.0.0.1, ::1 and every --san) in DIR/server.
    Init {
        /// The credentials directory.
        #[arg(long)]
        dir: PathBuf,
        /// Another DNS name or IP address the controller is reached at.
        #[arg(long)]
        san: Vec<String>,
    },
    /// Issue a client certificate from DIR's CA into DIR/nodes/NODE or DIR/admin (or --out).
    Issue {
        /// The credentials directory (holding the CA).
        #[arg(long)]
        dir: PathBuf,
        /// For this node's agent.
        #[arg(long, conflicts_with = "admin", required_unless_present = "admin")]
        node: Option<String>,
        /// For an administrator (`stackroute status`).
        #[arg(long)]
        admin: bool,
        /// Where to write ca.crt, tls.crt and tls.key.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

impl Action {
    /// Runs the action, printing the directory it wrote.
    pub fn run(self) -> anyhow::Result<()> {
        let now = SystemTime::now();
        match self {
            Self::Init { dir, san } => {
                let ca = ensure_ca(&dir, now)?;
                let mut names = vec!["localhost".to_string(), "127.0.0.1".into(), "::1".into()];
                names.extend(san);
                let server = dir.join("server");
                let leaf = certs::issue_serving(&ca, &names, now, certs::SERVING_VALIDITY)?;
                tls::write_pair(&server, &leaf, Some(&ca.cert_pem))?;
                println!("{}", server.display());
            }
            Self::Issue {
                dir,
                node,
                admin: _,
                out,
            } => {
                let ca = read_ca(&dir)?;
                let (caller, default_out) = match node {
                    Some(node) => {
                        stackroute_proto::validate::check_name("--node", &node)
                            .map_err(anyhow::Error::msg)?;
                        let out = dir.join("nodes").join(&node);
                        (Caller::Node(node), out)
                    }
                    None => (Caller::Admin, dir.join("admin")),
                };
                let out = out.unwrap_or(default_out);
                let leaf = certs::issue_client(&ca, &caller, now)?;
                tls::write_pair(&out, &leaf, Some(&ca.cert_pem))?;
                println!("{}", out.display());
            }
        }
        Ok(())
    }
}

fn read_ca(dir: &Path) -> anyhow::Result<Ca> {
    let read = |file: &str| {
        let path = dir.join(file);
        std::fs::read_to_string(&path).with_context(|| {
            format!(
                "reading {} (create the CA with `stackroute-controller credentials init --dir {}`)",
                path.display(),
                dir.display()
            )
        })
    };
    Ok(Ca {
        cert_pem: read(tls::CA_FILE)?,
        key_pem: read("ca.key")?,
    })
}

fn ensure_ca(dir: &Path, now: SystemTime) -> anyhow::Result<Ca> {
    if dir.join("ca.key").exists() {
        let ca = read_ca(dir)?;
        anyhow::ensure!(
            certs::ca_usable(&ca, now),
            "{}: the CA there is not usable (expired, or key and certificate differ)",
            dir.display()
        );
        return Ok(ca);
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .with_context(|| format!("restricting {}", dir.display()))?;
    let ca = certs::new_ca(now)?;
    tls::write_ca(dir, &ca)?;
    Ok(ca)
}
