//! The OCI image and the deployment manifests (issue 16): deploy/kubernetes validates strictly
//! against Kubernetes' own schemas and keeps its hardening, deploy/compose parses, and
//! deploy/kubernetes/connector-sidecar.yaml, played by podman into the lab's connector
//! namespace with the image deploy/oci/build.sh builds, serves its app and the lab's service
//! to the lab agent through its connector, which runs as uid 10001 with no capability on a
//! read-only root.
//!
//! podman 4.3 (Debian 12) needs a few changes to the manifest, made in the test's copy and
//! said where they are made: no Secret volumes, no published ports, no liveness probe, and the
//! pod in the lab's namespace through `nsenter` and `--network host` (its pods cannot join a
//! namespace by path).

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_yaml::Value;

use common::{require_root, Lab, BIN, SVC};

/// The lab for the pod test; its namespaces are `okcconn`, `okcagent`...
const PREFIX: &str = "okc";
/// The sidecar's app as the agent reaches it: the connector namespace's own address on the
/// service network (198.51.100.0/24, which the lab policy routes to the connector).
const APP_URL: &str = "http://198.51.100.1:8080/";
/// The name the lab's policy covers (`*.corp.internal`) and the test gives the app.
const APP_NAME: &str = "app.corp.internal";
/// The lab relay (192.0.2.1) by a name, for the connector that finds it through /etc/hosts.
const RELAY_NAME: &str = "relay.example.test";
/// The image's user (deploy/oci/build.sh).
const SLUICE_UID: u32 = 10001;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Fails with what to install when `tool` is not on PATH.
fn need(tool: &str, how: &str) {
    let found = std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()));
    assert!(
        found,
        "{tool} is missing: {how} (scripts/setup.sh installs it)"
    );
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Every YAML document in `path`.
fn documents(path: &Path) -> Vec<Value> {
    let s = fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::Deserializer::from_str(&s)
        .map(|d| {
            serde::Deserialize::deserialize(d)
                .unwrap_or_else(|e| panic!("{}: not YAML: {e}", path.display()))
        })
        .filter(|v: &Value| !v.is_null())
        .collect()
}

fn kind(doc: &Value) -> &str {
    doc["kind"].as_str().unwrap_or("")
}

fn name(doc: &Value) -> &str {
    doc["metadata"]["name"].as_str().unwrap_or("")
}

fn seq(v: &Value) -> &[Value] {
    v.as_sequence().map(Vec::as_slice).unwrap_or(&[])
}

fn manifests() -> Vec<PathBuf> {
    let dir = repo().join("deploy/kubernetes");
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    files
}

/// `kubernetes-validate --strict` on `files`, with no network (its schemas are bundled: a
/// validator that fetched them would fail here, as it would in an offline CI).
fn kubernetes_validate(files: &[PathBuf]) -> Output {
    Command::new("unshare")
        .args(["--net", "kubernetes-validate", "--strict", "--quiet"])
        .args(files)
        .output()
        .unwrap()
}

/// The keys configs/ROLE.yaml documents, set or commented out (`# metrics_listen: ...`).
fn documented_keys(role: &str) -> Vec<String> {
    let example = fs::read_to_string(repo().join(format!("configs/{role}.yaml"))).unwrap();
    example
        .lines()
        .map(|l| l.strip_prefix("# ").unwrap_or(l))
        .filter_map(|l| l.split_once(':').map(|(k, _)| k))
        .filter(|k| !k.is_empty() && k.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
        .map(str::to_string)
        .collect()
}

/// What every container of every pod template must say (the task's hardening).
fn check_hardening(file: &str, doc: &Value) {
    let pod = &doc["spec"]["template"]["spec"];
    let what = format!("{file}: {} {}", kind(doc), name(doc));
    assert_eq!(
        pod["securityContext"]["runAsNonRoot"].as_bool(),
        Some(true),
        "{what}: runAsNonRoot"
    );
    let containers = seq(&pod["containers"]);
    assert!(!containers.is_empty(), "{what}: no containers");
    let mut sluice = 0;
    for c in containers {
        let cname = format!("{what}, container {}", c["name"].as_str().unwrap_or("?"));
        let sc = &c["securityContext"];
        assert_eq!(
            sc["allowPrivilegeEscalation"].as_bool(),
            Some(false),
            "{cname}: allowPrivilegeEscalation"
        );
        assert_eq!(
            sc["readOnlyRootFilesystem"].as_bool(),
            Some(true),
            "{cname}: readOnlyRootFilesystem"
        );
        assert_eq!(
            seq(&sc["capabilities"]["drop"]),
            [Value::from("ALL")],
            "{cname}: capabilities.drop"
        );
        for k in ["requests", "limits"] {
            for r in ["cpu", "memory"] {
                assert!(
                    !c["resources"][k][r].is_null(),
                    "{cname}: resources.{k}.{r}"
                );
            }
        }
        let image = c["image"].as_str().unwrap_or("");
        if !image.contains("/sluice:") {
            continue;
        }
        sluice += 1;
        // The image the manifests name is the one this version builds.
        let want = format!("localhost/sluice:{}", env!("CARGO_PKG_VERSION"));
        assert_eq!(image, want, "{cname}: image");
        for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/ready")] {
            let get = &c[probe]["httpGet"];
            assert_eq!(get["path"].as_str(), Some(path), "{cname}: {probe}");
            assert_eq!(get["port"].as_u64(), Some(9464), "{cname}: {probe} port");
        }
        // A writable folder for the status socket, however read-only the root is.
        assert!(
            seq(&c["volumeMounts"])
                .iter()
                .any(|m| m["mountPath"].as_str() == Some("/run/sluice")),
            "{cname}: nothing mounted at /run/sluice for the status socket"
        );
        let uid = c["securityContext"]["runAsUser"]
            .as_u64()
            .or(pod["securityContext"]["runAsUser"].as_u64());
        assert_eq!(uid, Some(SLUICE_UID as u64), "{cname}: runAsUser");
    }
    assert_eq!(sluice, 1, "{what}: one Sluice container");
}

/// The Sluice configs and policies in a manifest's ConfigMaps: only documented keys, and
/// policies that `sluice policy check` accepts.
fn check_configmaps(file: &str, doc: &Value, scratch: &Path) {
    for (key, value) in doc["data"].as_mapping().into_iter().flatten() {
        let (Some(key), Some(value)) = (key.as_str(), value.as_str()) else {
            continue;
        };
        let role = match key {
            "connector.yaml" => "connector",
            "relay.yaml" => "relay",
            "policy.yaml" => {
                let p = scratch.join(format!("{}-policy.yaml", name(doc)));
                fs::write(&p, value).unwrap();
                let out = Command::new(BIN)
                    .args(["policy", "check"])
                    .arg(&p)
                    .output()
                    .unwrap();
                assert!(out.status.success(), "{file}: policy.yaml: {}", text(&out));
                continue;
            }
            _ => continue,
        };
        let cfg: Value = serde_yaml::from_str(value)
            .unwrap_or_else(|e| panic!("{file}: {key} is not YAML: {e}"));
        let known = documented_keys(role);
        for k in cfg.as_mapping().unwrap().keys() {
            let k = k.as_str().unwrap();
            assert!(
                known.iter().any(|d| d == k),
                "{file}: {key}: `{k}` is not a key of configs/{role}.yaml"
            );
        }
        assert!(
            cfg["metrics_listen"].as_str() == Some("0.0.0.0:9464"),
            "{file}: {key}: metrics_listen must be on the pod's address, port 9464"
        );
    }
}

#[test]
fn manifests_validate_strictly() {
    require_root();
    need(
        "kubernetes-validate",
        "python3 -m pip install kubernetes-validate",
    );
    need("unshare", "apt-get install util-linux");
    let files = manifests();
    let names: Vec<String> = files
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for want in ["connector-sidecar.yaml", "relay.yaml"] {
        assert!(
            names.iter().any(|n| n == want),
            "deploy/kubernetes: no {want}"
        );
    }
    let out = kubernetes_validate(&files);
    assert!(
        out.status.success(),
        "kubernetes-validate --strict: {}",
        text(&out)
    );
    eprintln!("kubernetes-validate --strict: {} pass", names.join(", "));

    // Strict indeed: a misspelt field is refused (and the validator really read the files).
    let scratch = std::env::temp_dir().join(format!("sluice-manifests-{}", std::process::id()));
    let _ = fs::remove_dir_all(&scratch);
    fs::create_dir_all(&scratch).unwrap();
    let sidecar = fs::read_to_string(repo().join("deploy/kubernetes/connector-sidecar.yaml"))
        .unwrap()
        .replace("readOnlyRootFilesystem", "readOnlyRootFileSystem");
    let typo = scratch.join("typo.yaml");
    fs::write(&typo, sidecar).unwrap();
    let out = kubernetes_validate(&[typo]);
    assert!(
        !out.status.success() && text(&out).contains("readOnlyRootFileSystem"),
        "kubernetes-validate --strict let a misspelt field through: {}",
        text(&out)
    );

    let mut kinds = Vec::new();
    for (file, path) in names.iter().zip(&files) {
        for doc in documents(path) {
            kinds.push(format!("{file}: {} {}", kind(&doc), name(&doc)));
            match kind(&doc) {
                "Deployment" => check_hardening(file, &doc),
                "ConfigMap" => check_configmaps(file, &doc, &scratch),
                _ => {}
            }
        }
    }
    // The relay's Service carries QUIC (UDP 4433); its metrics (TCP 9464) are served too.
    let relay = documents(&repo().join("deploy/kubernetes/relay.yaml"));
    let ports: Vec<(u64, String)> = relay
        .iter()
        .filter(|d| kind(d) == "Service")
        .flat_map(|d| seq(&d["spec"]["ports"]))
        .map(|p| {
            let proto = p["protocol"].as_str().unwrap_or("TCP").to_string();
            (p["port"].as_u64().unwrap_or(0), proto)
        })
        .collect();
    for want in [(4433, "UDP"), (9464, "TCP")] {
        assert!(
            ports.iter().any(|(p, proto)| (*p, proto.as_str()) == want),
            "relay.yaml: no Service port {want:?} in {ports:?}"
        );
    }
    let _ = fs::remove_dir_all(&scratch);

    // The compose file: a real YAML parser, and the connector beside its app, hardened alike.
    let compose = repo().join("deploy/compose/compose.yaml");
    let docs = documents(&compose);
    assert_eq!(docs.len(), 1, "compose.yaml: one document");
    let services = &docs[0]["services"];
    let conn = &services["connector"];
    assert!(!services["app"].is_null(), "compose.yaml: no `app` service");
    assert_eq!(
        conn["network_mode"].as_str(),
        Some("service:app"),
        "compose.yaml"
    );
    assert_eq!(
        conn["read_only"].as_bool(),
        Some(true),
        "compose.yaml: read_only"
    );
    assert_eq!(seq(&conn["cap_drop"]), [Value::from("ALL")], "compose.yaml");
    assert_eq!(
        conn["user"].as_str(),
        Some(format!("{SLUICE_UID}:{SLUICE_UID}").as_str())
    );
    assert!(
        seq(&conn["volumes"])
            .iter()
            .any(|v| v.as_str().is_some_and(|v| v.ends_with(":/run/sluice"))),
        "compose.yaml: nothing mounted at /run/sluice for the status socket"
    );
    eprintln!("checked {} and compose.yaml", kinds.join("; "));
}

/// Runs podman (or buildah) with the lab's containers.conf: runc and low rlimits (crun, and
/// podman's default nofile, fail to start containers here).
fn podman(conf: &Path, args: &[&str]) -> Output {
    Command::new("podman")
        .env("CONTAINERS_CONF", conf)
        .args(args)
        .output()
        .unwrap()
}

fn podman_ok(conf: &Path, args: &[&str]) -> String {
    let out = podman(conf, args);
    assert!(out.status.success(), "podman {args:?}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Removes what the test made in podman's storage (also when it fails); dropped before the lab,
/// so the pod is gone before `lab down` empties its namespace.
struct PodmanObjects {
    conf: PathBuf,
    containers: Vec<String>,
    volumes: Vec<String>,
    images: Vec<String>,
}

impl Drop for PodmanObjects {
    fn drop(&mut self) {
        let conf = self.conf.clone();
        let run = |args: &[&str]| {
            let _ = podman(&conf, args);
        };
        if std::thread::panicking() {
            for c in podman(&conf, &["ps", "-a", "--format", "{{.Names}}"])
                .stdout
                .split(|b| *b == b'\n')
                .map(|n| String::from_utf8_lossy(n).into_owned())
                .filter(|n| n.starts_with(PREFIX))
            {
                eprintln!(
                    "---- podman logs {c} ----\n{}",
                    text(&podman(&conf, &["logs", &c]))
                );
            }
        }
        for c in &self.containers {
            run(&["rm", "-f", "-t", "0", c]);
        }
        // The pods `kube play` made from the test's copy (their names vary with podman's
        // version: DEPLOYMENT-pod-0 in 4.3).
        let pods = podman(&conf, &["pod", "ps", "--format", "{{.Name}}"]);
        for p in String::from_utf8_lossy(&pods.stdout)
            .lines()
            .filter(|p| p.starts_with(&format!("{PREFIX}-")))
        {
            run(&["pod", "rm", "-f", "-t", "0", p]);
        }
        for v in &self.volumes {
            run(&["volume", "rm", "-f", v]);
        }
        for i in &self.images {
            run(&["rmi", "-f", i]);
        }
    }
}

/// The demo app's image: Debian's static busybox, whose httpd the manifest's app runs.
fn build_app_image(tag: &str, dir: &Path) {
    let root = dir.join("rootfs/bin");
    fs::create_dir_all(&root).unwrap();
    fs::copy("/usr/bin/busybox", root.join("busybox")).unwrap();
    std::os::unix::fs::symlink("busybox", root.join("httpd")).unwrap();
    fs::write(dir.join("Containerfile"), "FROM scratch\nCOPY rootfs/ /\n").unwrap();
    let out = Command::new("buildah")
        .args(["build", "--quiet", "-t", tag])
        .arg(dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "buildah build {tag}: {}", text(&out));
}

/// The lab's version of connector-sidecar.yaml: the lab's relay, policy and certificates, the
/// images built here, object names under the test's prefix, and what podman 4.3 needs.
fn play_copy(lab: &Lab, image: &str, app_image: &str) -> (String, Vec<String>, String) {
    let path = repo().join("deploy/kubernetes/connector-sidecar.yaml");
    let mut docs = documents(&path);
    let read = |f: &str| fs::read_to_string(lab.dir.join(f)).unwrap();
    let renamed = |n: &str| format!("{PREFIX}-{n}");
    let mut volumes = Vec::new();
    let mut page = String::new();
    for doc in &mut docs {
        let old = name(doc).to_string();
        doc["metadata"]["name"] = renamed(&old).into();
        let k = kind(doc).to_string();
        match k.as_str() {
            "ConfigMap" if doc["data"]["connector.yaml"].is_string() => {
                let cfg = doc["data"]["connector.yaml"].as_str().unwrap();
                assert!(
                    cfg.contains("relay: relay.example.com:4433"),
                    "the manifest's relay placeholder changed: update this test\n{cfg}"
                );
                let cfg = cfg.replace("relay.example.com:4433", "192.0.2.1:4433");
                doc["data"]["connector.yaml"] = cfg.into();
                // The lab's: it routes 198.51.100.0/24 and *.corp.internal to lab-connector,
                // the name in the certificate below.
                doc["data"]["policy.yaml"] = read("policy.yaml").into();
            }
            "ConfigMap" => {
                if let Some(p) = doc["data"]["index.html"].as_str() {
                    page = p.trim().to_string();
                }
            }
            // podman before 4.4 cannot mount a Secret: it crashes on a secret volume without
            // `optional`, and with it writes the files still base64-encoded. The same files
            // in a ConfigMap of the same name mount alike.
            "Secret" => {
                assert!(doc["stringData"]["connector.key"].is_string(), "{doc:?}");
                let mut data = serde_yaml::Mapping::new();
                data.insert("connector.pem".into(), read("lab-connector.pem").into());
                data.insert("connector.key".into(), read("lab-connector.key").into());
                data.insert("ca.pem".into(), read("ca/ca.pem").into());
                let mut cm = serde_yaml::Mapping::new();
                cm.insert("apiVersion".into(), "v1".into());
                cm.insert("kind".into(), "ConfigMap".into());
                cm.insert("metadata".into(), doc["metadata"].clone());
                cm.insert("data".into(), Value::Mapping(data));
                *doc = Value::Mapping(cm);
            }
            "Deployment" => {
                let pod = &mut doc["spec"]["template"]["spec"];
                // podman names an emptyDir's volume after it: under the prefix too.
                for v in pod["volumes"].as_sequence_mut().unwrap() {
                    let n = renamed(v["name"].as_str().unwrap());
                    if !v["emptyDir"].is_null() {
                        volumes.push(n.clone());
                    }
                    v["name"] = n.into();
                }
                for c in pod["containers"].as_sequence_mut().unwrap() {
                    for m in c["volumeMounts"].as_sequence_mut().unwrap() {
                        m["name"] = renamed(m["name"].as_str().unwrap()).into();
                    }
                }
                for v in pod["volumes"].as_sequence_mut().unwrap() {
                    for src in ["configMap", "secret"] {
                        let key = if src == "secret" {
                            "secretName"
                        } else {
                            "name"
                        };
                        if let Some(n) = v[src][key].as_str().map(str::to_string) {
                            volumes.push(renamed(&n));
                            let mut m = serde_yaml::Mapping::new();
                            m.insert("name".into(), renamed(&n).into());
                            v.as_mapping_mut().unwrap().remove(src);
                            v["configMap"] = Value::Mapping(m);
                        }
                    }
                }
                // The lab's name for the app (the lab policy covers *.corp.internal).
                pod["hostAliases"][0]["hostnames"] = vec![Value::from(APP_NAME)].into();
                for c in pod["containers"].as_sequence_mut().unwrap() {
                    let m = c.as_mapping_mut().unwrap();
                    // podman 4.3 publishes every containerPort on the host, which needs a
                    // network of its own; in the lab's namespace they are reachable anyway.
                    m.remove("ports");
                    // podman runs an httpGet liveness probe as `curl` in the container (the
                    // image has none) and restarts it on failure, where systemd runs the
                    // timer. The test checks /healthz and /ready itself.
                    m.remove("livenessProbe");
                    let img = if m.get("name").and_then(Value::as_str) == Some("app") {
                        app_image
                    } else {
                        image
                    };
                    m.insert("image".into(), img.into());
                }
            }
            _ => {}
        }
    }
    assert!(
        !page.is_empty(),
        "the manifest's demo page is gone: update this test"
    );
    let yaml: Vec<String> = docs
        .iter()
        .map(|d| serde_yaml::to_string(d).unwrap())
        .collect();
    (yaml.join("---\n"), volumes, page)
}

fn wait_until(what: &str, within: Duration, mut ok: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    while !ok() {
        assert!(t0.elapsed() < within, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    t0.elapsed()
}

/// `curl` of the connector's metrics port in its namespace (the pod's, here): the status code.
fn probe(lab: &Lab, path: &str) -> String {
    let url = format!("http://127.0.0.1:9464{path}");
    let out = lab.exec(
        "conn",
        &[
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "2",
            &url,
        ],
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// uid, effective capabilities and no_new_privs of process `pid`.
fn credentials(pid: &str) -> (u32, u64, bool) {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |k: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(k))
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .to_string()
    };
    (
        field("Uid:").parse().unwrap(),
        u64::from_str_radix(&field("CapEff:"), 16).unwrap(),
        field("NoNewPrivs:") == "1",
    )
}

/// `url` from the agent, tried again until `within`: a connector that just started takes a
/// moment to register and to be found by the agent's tunnel.
fn fetch(lab: &Lab, url: &str, within: Duration) -> String {
    let mut last = String::new();
    wait_until(&format!("{url} from the agent"), within, || {
        let out = lab.curl(url, "5");
        last = text(&out);
        out.status.success()
    });
    last
}

#[test]
fn podman_sidecar_pod_serves_a_page_through_the_tunnel() {
    require_root();
    for (tool, how) in [
        ("podman", "apt-get install podman"),
        ("buildah", "apt-get install buildah"),
        ("runc", "apt-get install runc"),
        ("nsenter", "apt-get install util-linux"),
        ("busybox", "apt-get install busybox-static"),
    ] {
        need(tool, how);
    }
    let t_all = Instant::now();

    // The image, as an operator builds it.
    let t0 = Instant::now();
    let out = Command::new(repo().join("deploy/oci/build.sh"))
        .arg(BIN)
        .output()
        .unwrap();
    assert!(out.status.success(), "deploy/oci/build.sh: {}", text(&out));
    let image = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let t_build = t0.elapsed();
    assert_eq!(
        image,
        format!("localhost/sluice:{}", env!("CARGO_PKG_VERSION")),
        "build.sh prints the image name"
    );

    let lab = Lab::up(PREFIX);
    let conf = lab.dir.join("containers.conf");
    fs::write(
        &conf,
        "[containers]\ndefault_ulimits = [\"nofile=1024:1024\", \"nproc=1024:1024\"]\n\
         [engine]\nruntime = \"runc\"\n",
    )
    .unwrap();
    let app_image = format!("localhost/{PREFIX}-sidecar-app:test");
    let mut objects = PodmanObjects {
        conf: conf.clone(),
        containers: Vec::new(),
        volumes: Vec::new(),
        images: vec![app_image.clone()],
    };
    let format = "{{.Id}} {{.Config.User}} {{.Config.Entrypoint}}";
    let inspect = podman_ok(&conf, &["image", "inspect", "--format", format, &image]);
    assert!(
        inspect.ends_with(" 10001:10001 [/usr/bin/sluice]"),
        "{image}: {inspect}"
    );
    let latest = podman_ok(
        &conf,
        &[
            "image",
            "inspect",
            "--format",
            format,
            "localhost/sluice:latest",
        ],
    );
    assert_eq!(latest, inspect, "localhost/sluice:latest is {image}");
    build_app_image(&app_image, &lab.dir.join("app-image"));

    // The pod replaces the lab's connector: same certificate, same relay.
    lab.stop("connector", "TERM");
    let (yaml, volumes, page) = play_copy(&lab, &image, &app_image);
    objects.volumes = volumes;
    let deployment = format!("{PREFIX}-demo-app");
    let play = lab.dir.join("connector-sidecar.yaml");
    fs::write(&play, &yaml).unwrap();
    // podman 4.3's pods cannot join a namespace by path ("pods presently do not support
    // network mode path"), but a host-network pod shares the network namespace podman runs
    // in. nsenter, not `ip netns exec`: that mounts a new /sys, without the cgroup hierarchy
    // podman needs ("creating cgroup for cpu: mkdir /sys/fs/cgroup/cpu").
    let t0 = Instant::now();
    let out = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", lab.ns("conn")))
        // --replace: a pod a killed run left behind goes first.
        .args(["podman", "kube", "play", "--replace", "--network", "host"])
        .arg(&play)
        .env("CONTAINERS_CONF", &conf)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "podman kube play: {}\n{yaml}",
        text(&out)
    );
    wait_until(
        "the pod's connector /ready",
        Duration::from_secs(20),
        || probe(&lab, "/ready") == "200",
    );
    let t_ready = t0.elapsed();
    assert_eq!(probe(&lab, "/healthz"), "200");
    eprintln!("kube play to the pod's connector's /ready 200: {t_ready:?}");
    let names = podman_ok(&conf, &["ps", "--format", "{{.Names}}"]);
    let container = names
        .lines()
        .find(|n| n.starts_with(&deployment) && n.ends_with("-sluice-connector"))
        .unwrap_or_else(|| panic!("no connector container in {names:?}"))
        .to_string();

    // The app in the pod, and the lab's private service, through the pod's connector.
    let body = fetch(&lab, APP_URL, Duration::from_secs(15));
    assert!(body.contains(&page), "{APP_URL}: {body}");
    let body = fetch(&lab, &format!("http://{SVC}/"), Duration::from_secs(5));
    assert!(body.contains("Hello from the private service"), "{body}");
    let logs = text(&podman(&conf, &["logs", &container]));
    assert!(
        logs.contains("\"destination\":\"198.51.100.1:8080\"")
            && logs.contains("\"decision\":\"allow\""),
        "the pod's connector did not decide the flow to its app:\n{logs}"
    );

    // Unprivileged: the image's user, no capability, no way to gain one, read-only root.
    let pid = podman_ok(
        &conf,
        &["inspect", "--format", "{{.State.Pid}}", &container],
    );
    assert_eq!(
        credentials(&pid),
        (SLUICE_UID, 0, true),
        "uid, CapEff, NoNewPrivs"
    );
    let ro = podman_ok(
        &conf,
        &[
            "inspect",
            "--format",
            "{{.HostConfig.ReadonlyRootfs}}",
            &container,
        ],
    );
    assert_eq!(ro, "true", "read-only root");
    // Its status socket on the emptyDir answers (`sluice status` from the image itself). The
    // snapshot it serves is renewed periodically: the agent's tunnel may take a moment.
    let mut status = serde_json::Value::Null;
    wait_until(
        "the agent's tunnel in `sluice status`",
        Duration::from_secs(5),
        || {
            let out = podman_ok(
                &conf,
                &[
                    "exec",
                    &container,
                    "/usr/bin/sluice",
                    "status",
                    "--socket",
                    "/run/sluice/connector/status.sock",
                    "--json",
                ],
            );
            status = serde_json::from_str(&out).unwrap();
            status["tunnels"][0]["user"] == "lab-agent"
        },
    );
    assert_eq!(status["name"], "lab-connector", "{status:#}");
    assert_eq!(status["relay"]["connected"], true, "{status:#}");
    // Without CAP_NET_RAW a ping goes unanswered, and the connector says why.
    let ping = lab.exec("agent", &["ping", "-c", "1", "-W", "2", SVC]);
    assert!(
        !ping.status.success(),
        "a ping was answered: {}",
        text(&ping)
    );
    let logs = text(&podman(&conf, &["logs", &container]));
    assert!(logs.contains("cannot open a raw ICMP socket"), "{logs}");

    // hostAliases, the manifest's way to the app by name, do not reach the containers of a
    // host-network pod in podman 4.3 (each gets the host's /etc/hosts). The same image,
    // config and files in a container of its own, with the alias, stand in for it. Its relay
    // is given by name too (as in a cluster), which the image's glibc resolves from
    // /etc/hosts (nsswitch.conf: files, then DNS).
    let t0 = Instant::now();
    podman_ok(&conf, &["stop", "-t", "5", &container]);
    let alone = format!("{PREFIX}-connector-by-name");
    objects.containers.push(alone.clone());
    let config = format!("{PREFIX}-sluice-connector:/etc/sluice/config:ro");
    let tls = format!("{PREFIX}-sluice-connector-tls:/etc/sluice/tls:ro");
    let netns = format!("ns:/run/netns/{}", lab.ns("conn"));
    let alias = format!("{APP_NAME}:127.0.0.1");
    let relay_alias = format!("{RELAY_NAME}:192.0.2.1");
    let relay = format!("{RELAY_NAME}:4433");
    podman_ok(
        &conf,
        &[
            "run",
            "-d",
            "--replace",
            "--name",
            &alone,
            "--network",
            &netns,
            "--add-host",
            &alias,
            "--add-host",
            &relay_alias,
            "--read-only",
            "--cap-drop",
            "ALL",
            "--security-opt",
            "no-new-privileges",
            "--mount",
            "type=tmpfs,destination=/run/sluice,chown=true",
            "-v",
            &config,
            "-v",
            &tls,
            &image,
            "connector",
            "--config",
            "/etc/sluice/config/connector.yaml",
            "--relay",
            &relay,
        ],
    );
    wait_until(
        "the connector by name /ready",
        Duration::from_secs(20),
        || probe(&lab, "/ready") == "200",
    );
    let logs = text(&podman(&conf, &["logs", &alone]));
    assert!(
        logs.contains(&format!("relay {relay}")) && logs.contains("connected to relay"),
        "{logs}"
    );
    let url = format!("http://{APP_NAME}:8080/");
    let body = fetch(&lab, &url, Duration::from_secs(20));
    assert!(body.contains(&page), "{url}: {body}");
    eprintln!("{url} through the connector by name: {:?}", t0.elapsed());

    eprintln!("image build {t_build:?}; whole test {:?}", t_all.elapsed());
    drop(objects);
    drop(lab);
}
