//! Restarts, expiry and duplicates (issue 14, items 4 to 6): a connector that stops or is
//! killed is seen as gone within seconds and is used again as soon as it is back; a
//! certificate that expires ends access at that moment; two connectors with one certificate
//! do not take the relay from each other. Real binaries in a lab each.

mod common;

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use common::*;

fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    while !f() {
        assert!(
            t0.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    t0.elapsed()
}

fn page_works(lab: &Lab, max_time: &str) -> bool {
    lab.curl(&format!("http://{SVC}/"), max_time)
        .status
        .success()
}

fn status_json(lab: &Lab) -> String {
    let out = Command::new(BIN)
        .args(["status", "--json", "--socket"])
        .arg(lab.dir.join("agent.sock"))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn tunnel_state(lab: &Lab) -> String {
    let s = status_json(lab);
    s.split("\"state\": \"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .unwrap_or("none")
        .to_string()
}

/// A TCP connection from the agent's namespace to the data server, left open and idle.
fn open_flow(lab: &Lab) -> TcpStream {
    in_netns(&lab.ns("agent"), || {
        let mut s = TcpStream::connect((SVC, DATA_PORT)).unwrap();
        // Half a request: the server waits for the rest, so the connection stays open.
        s.write_all(b"D").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    })
    .join()
    .unwrap()
}

/// Writes on an open flow and says how it ended: a reset is what the app must see (the write
/// reports a reset that came before it; the read, one that answers it).
fn poke(mut s: TcpStream) -> std::io::ErrorKind {
    if let Err(e) = s.write_all(&[0u8; 16]) {
        return e.kind();
    }
    let mut b = [0u8; 1];
    match s.read(&mut b) {
        Ok(0) => std::io::ErrorKind::UnexpectedEof,
        Ok(_) => std::io::ErrorKind::Other,
        Err(e) => e.kind(),
    }
}

#[test]
fn a_stopped_or_killed_connector_is_seen_gone_and_used_again_once_back() {
    require_root();
    let lab = Lab::up("lc4-");
    start_data_server(&lab);
    assert!(page_works(&lab, "3"));

    // SIGTERM: the connector says goodbye; the agent and the relay know at once.
    let t0 = Instant::now();
    lab.stop("connector", "TERM");
    wait_for(
        "the agent to hear the goodbye",
        Duration::from_secs(2),
        || {
            lab.log("agent")
                .contains("peer closed the connection: stopping")
        },
    );
    wait_for(
        "the relay to drop the connector",
        Duration::from_secs(2),
        || {
            lab.log("relay")
                .lines()
                .any(|l| l.contains("connector \"lab-connector\"") && l.contains("disconnected"))
        },
    );
    assert!(t0.elapsed() < Duration::from_secs(3));
    lab.start("connector", "conn");
    let back = wait_for("a page after the restart", Duration::from_secs(5), || {
        page_works(&lab, "1")
    });
    eprintln!("page {back:?} after the connector's restart (SIGTERM)");

    // SIGKILL: no goodbye. Open flows, then kill.
    let during = open_flow(&lab);
    let after = open_flow(&lab);
    // Their first bytes are acknowledged (else the app's retransmissions would reach the agent
    // while the connector is dead, and both flows would be reset then).
    std::thread::sleep(Duration::from_secs(1));
    lab.stop("connector", "KILL");
    let killed = Instant::now();
    // New flows notice: within a few seconds the tunnel is down and says so.
    let gone = wait_for(
        "the status to show the tunnel down",
        Duration::from_secs(12),
        || {
            let _ = page_works(&lab, "1");
            tunnel_state(&lab) != "up"
        },
    );
    eprintln!("tunnel seen down {:?} after SIGKILL", killed.elapsed());
    assert!(gone < Duration::from_secs(10));
    // An open flow to the dead connector is reset, not left hanging (the agent resets the
    // flows a tunnel carried when it closes).
    let t = Instant::now();
    let kind = poke(during);
    assert_eq!(
        kind,
        std::io::ErrorKind::ConnectionReset,
        "while the connector is dead"
    );
    assert!(t.elapsed() < Duration::from_secs(3));

    lab.start("connector", "conn");
    let back = wait_for("a page after the restart", Duration::from_secs(5), || {
        page_works(&lab, "1")
    });
    eprintln!("page {back:?} after the connector's restart (SIGKILL)");
    // The status snapshot is refreshed once a second.
    wait_for(
        "the status to show the tunnel up",
        Duration::from_secs(3),
        || tunnel_state(&lab) == "up",
    );
    // A flow from before the kill is reset too (by the agent when the tunnel closed, or else
    // by the new connector, which never knew it).
    let t = Instant::now();
    assert_eq!(
        poke(after),
        std::io::ErrorKind::ConnectionReset,
        "after the restart"
    );
    assert!(t.elapsed() < Duration::from_secs(3));
}

#[test]
fn an_expiring_agent_certificate_ends_access_at_that_moment() {
    require_root();
    let lab = Lab::up("lc5-");
    start_data_server(&lab);
    let valid = 25u64;
    let issued = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let dir = lab.dir.display().to_string();
    let out = Command::new(BIN)
        .args([
            "ca",
            "issue",
            "--dir",
            &format!("{dir}/ca"),
            "--out",
            &dir,
            "--role",
            "agent",
            "--name",
            "lab-agent",
            "--group",
            "lab",
            "--valid",
            &format!("{valid}s"),
            "--force",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    lab.stop("agent", "TERM");
    lab.start("agent", "agent");
    wait_for(
        "the agent with its short certificate",
        Duration::from_secs(10),
        || page_works(&lab, "1"),
    );
    // A slow download that would outlast the certificate by far.
    let reader = in_netns(&lab.ns("agent"), || {
        let mut s = TcpStream::connect((SVC, DATA_PORT)).unwrap();
        s.write_all(&data_request(b'D', 1 << 40, 7)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = vec![0u8; 16 * 1024];
        let mut total = 0u64;
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n as u64,
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        (SystemTime::now(), total)
    });
    let (ended, total) = reader.join().unwrap();
    let ended = ended
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let expiry = (issued + valid) as f64;
    eprintln!(
        "download cut {:.1}s after the expiry, {total} bytes",
        ended - expiry
    );
    assert!(total > 1 << 20, "the download ran");
    assert!(ended >= expiry - 1.0, "not before the expiry");
    assert!(
        ended <= expiry + 3.0,
        "within 2 s of it (the expiry is known to the second)"
    );

    // The relay refuses the expired certificate; the agent backs off, and says why.
    let refused = |log: &str| log.matches("handshake with 192.0.2.10").count();
    let before = refused(&lab.log("relay"));
    std::thread::sleep(Duration::from_secs(10));
    let attempts = refused(&lab.log("relay")) - before;
    assert!(
        attempts <= 6,
        "{attempts} attempts in 10 s:\n{}",
        lab.log("relay")
    );
    let status = status_json(&lab);
    assert!(status.contains("\"connected\": false"), "{status}");
    assert!(status.contains("expired"), "{status}");
}

#[test]
fn two_connectors_with_one_certificate_do_not_take_the_relay_from_each_other() {
    require_root();
    let lab = Lab::up("lc6-");
    assert!(page_works(&lab, "3"));
    // The same config started twice, as a copied config or an attempt at high availability
    // (less its metrics address: one port serves one process, and a second is refused).
    let cfg = fs::read_to_string(lab.dir.join("connector.yaml")).unwrap();
    let cfg: String = cfg
        .lines()
        .filter(|l| !l.starts_with("metrics_listen:"))
        .map(|l| format!("{l}\n"))
        .collect();
    fs::write(lab.dir.join("connector2.yaml"), cfg).unwrap();
    let log = fs::File::create(lab.dir.join("connector2.log")).unwrap();
    let mut second = Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.ns("conn"),
            BIN,
            "connector",
            "--config",
        ])
        .arg(lab.dir.join("connector2.yaml"))
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let _guard = KillOnDrop(second.id());
    std::thread::sleep(Duration::from_secs(30));
    let relay = lab.log("relay");
    let dup = relay.matches("WARN relay: duplicate identity").count();
    let joins = relay
        .lines()
        .filter(|l| l.contains("connector \"lab-connector\"") && l.contains("connected from"))
        .count();
    assert_eq!(dup, 1, "the relay says it once:\n{relay}");
    assert!(
        joins <= 4,
        "no flapping: {joins} connections in 30 s:\n{relay}"
    );
    let first = lab.log("connector");
    let second_log = fs::read_to_string(lab.dir.join("connector2.log")).unwrap();
    let told = first
        .matches("another node with this certificate is connected")
        .count()
        + second_log
            .matches("another node with this certificate is connected")
            .count();
    assert!(
        (1..=2).contains(&told),
        "the one kept off says so:\n{first}\n---\n{second_log}"
    );
    assert!(page_works(&lab, "3"), "the one kept serves");
    let _ = second.kill();
    let _ = second.wait();
}

/// Kills a process when the test ends, however it ends.
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", &self.0.to_string()])
            .status();
    }
}
