//! Tests of the testbed itself. They need root and fail (never skip) without it.

use std::net::Ipv4Addr;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::*;

/// Reachability right after set-up is polled, not bet on one packet: a busy machine can lose the first one.
const REACH: Duration = Duration::from_secs(5);

const T: Duration = Duration::from_secs(10);
const MS10: Duration = Duration::from_millis(10);

fn netns_exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

fn assert_mac(mac: &str) {
    let parts: Vec<&str> = mac.split(':').collect();
    assert_eq!(parts.len(), 6, "{mac}");
    assert!(parts.iter().all(|p| p.len() == 2 && u8::from_str_radix(p, 16).is_ok()), "{mac}");
}

#[test]
fn require_root_passes_for_root() {
    require_root();
}

#[test]
fn two_hosts_ping_and_everything_is_cleaned_up() {
    let tb = Testbed::new("ping").unwrap();
    let a = tb.add_host("a", "10.0.0.11/24").unwrap();
    let b = tb.add_host("b", "10.0.0.12/24").unwrap();
    assert_eq!(a.ip(), Ipv4Addr::new(10, 0, 0, 11));
    assert_eq!(b.cidr(), "10.0.0.12/24");
    assert!(a.netns().starts_with(&format!("fu{}x", std::process::id())), "{}", a.netns());
    assert_eq!(tb.lan().bridge(), "br0");

    a.wait_ping(b.ip(), REACH).unwrap();
    b.wait_ping(a.ip(), REACH).unwrap();

    let (mac_a, mac_b) = (a.mac().unwrap(), b.mac().unwrap());
    assert_mac(&mac_a);
    assert_mac(&mac_b);
    assert_ne!(mac_a, mac_b);
    let neigh = a.ip_cmd(&["neigh", "show", "10.0.0.12"]).unwrap();
    assert!(neigh.contains(&mac_b), "a's neighbour entry for b {neigh:?} should hold b's MAC {mac_b}");
    assert!(a.ifindex_of("eth0").unwrap() > 1);
    assert_eq!(a.run(&["echo", "inside"]).unwrap(), "inside\n");
    let err = a.run(&["sh", "-c", "echo bad >&2; exit 4"]).unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains(a.netns()) && msg.contains("exit status: 4") && msg.contains("bad"), "{msg}");

    // A leaked process (not guarded) inside a namespace is killed by the testbed's Drop.
    let mut leaked = a.command("sleep").arg("1000").stdout(Stdio::null()).spawn().unwrap();
    wait_until("the leaked sleep to be inside a's namespace", T, Duration::from_millis(10), || {
        Ok(netns_pids(a.netns())?.contains(&leaked.id()))
    })
    .unwrap();

    let namespaces = tb.namespaces();
    assert_eq!(namespaces.len(), 3, "{namespaces:?}");
    assert!(namespaces.iter().all(|n| netns_exists(n)));
    drop(tb);
    for ns in &namespaces {
        assert!(!netns_exists(ns), "namespace {ns} still exists after the testbed was dropped");
    }
    let status = leaked.wait().unwrap();
    assert_eq!(status.signal(), Some(9), "the leaked process should have been SIGKILLed: {status}");
}

#[test]
fn nginx_serves_another_host_and_a_vip() {
    let tb = Testbed::new("nginx").unwrap();
    let client = tb.add_host("client", "10.0.0.2/24").unwrap();
    let web = tb.add_host("web", "10.0.0.12/24").unwrap();
    let web2 = tb.add_host("web2", "10.0.0.13/24").unwrap();
    let nginx = web.start_nginx(8080).unwrap();
    let nginx2 = web2.start_nginx(8080).unwrap();
    assert!(web.tcp_listening(8080).unwrap());
    assert!(!client.tcp_listening(8080).unwrap());

    assert_eq!(client.curl("http://10.0.0.12:8080/", &[]).unwrap(), "host=web\n");
    assert_eq!(client.curl("http://10.0.0.13:8080/", &[]).unwrap(), "host=web2\n");
    assert_eq!(client.curl("http://10.0.0.12:8080/health", &[]).unwrap(), "ok\n");
    let headers = client.curl("http://10.0.0.12:8080/health", &["-D", "-", "-o", "/dev/null"]).unwrap();
    assert!(headers.contains("X-Backend: web"), "{headers}");
    let err = client.curl("http://10.0.0.12:8080/missing", &[]).unwrap_err();
    assert!(format!("{err:#}").contains("404"), "{err:#}");

    // A VIP on lo: nginx listens on 0.0.0.0 so it answers there too.
    web.add_address("10.0.0.100/32", "lo").unwrap();
    let who = client.curl("http://10.0.0.100:8080/whoami", &[]).unwrap();
    assert!(who.starts_with("host=web client=10.0.0.2:") && who.ends_with(" server=10.0.0.100:8080\n"), "{who}");

    // A big random file, checksummed on both ends.
    let big = nginx.set_big_file(3 * 1024 * 1024 + 17).unwrap();
    let want = sha256_file(&big).unwrap();
    let out = tempfile::tempdir().unwrap();
    let got_path = out.path().join("got.bin");
    client.curl("http://10.0.0.12:8080/big", &["-o", got_path.to_str().unwrap()]).unwrap();
    assert_eq!(std::fs::metadata(&got_path).unwrap().len(), 3 * 1024 * 1024 + 17);
    assert_eq!(sha256_file(&got_path).unwrap(), want);
    nginx.add_file("dir/small.txt", b"small\n").unwrap();
    assert_eq!(client.curl("http://10.0.0.12:8080/dir/small.txt", &[]).unwrap(), "small\n");
    assert!(nginx.add_file("../escape", b"x").is_err());

    assert!(nginx.access_log().contains("10.0.0.2 "), "{}", nginx.access_log());
    nginx.stop().unwrap();
    assert!(!web.tcp_listening(8080).unwrap());
    assert!(client.curl("http://10.0.0.12:8080/", &["--max-time", "2"]).is_err());
    assert_eq!(client.curl("http://10.0.0.13:8080/", &[]).unwrap(), "host=web2\n");
    drop(nginx2);
    assert!(!web2.tcp_listening(8080).unwrap());
}

#[test]
fn concurrent_testbeds_do_not_collide() {
    // Same addresses, same host names, same ports in every testbed: all isolated.
    let results: Vec<(String, String, String)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..3)
            .map(|i| {
                s.spawn(move || {
                    let tb = Testbed::new(&format!("par{i}")).unwrap();
                    let client = tb.add_host("client", "10.0.0.1/24").unwrap();
                    let srv = tb.add_host("srv", "10.0.0.2/24").unwrap();
                    let nginx = srv.start_nginx(80).unwrap();
                    nginx.add_file("id", format!("testbed {i}\n").as_bytes()).unwrap();
                    client.wait_ping("10.0.0.2", REACH).unwrap();
                    let neigh = client.ip_cmd(&["neigh", "show", "10.0.0.2"]).unwrap();
                    let mac = srv.mac().unwrap();
                    assert!(neigh.contains(&mac), "testbed {i}: {neigh:?} should hold its own srv MAC {mac}");
                    let body = client.curl("http://10.0.0.2/id", &[]).unwrap();
                    (tb.prefix().to_string(), body, mac)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, (_, body, _)) in results.iter().enumerate() {
        assert_eq!(body, &format!("testbed {i}\n"));
    }
    let mut prefixes: Vec<_> = results.iter().map(|r| r.0.clone()).collect();
    prefixes.sort();
    prefixes.dedup();
    assert_eq!(prefixes.len(), 3);
    for p in &prefixes {
        let left: Vec<_> = list_netns().unwrap().into_iter().filter(|n| n.starts_with(&format!("{p}-"))).collect();
        assert!(left.is_empty(), "leftover namespaces {left:?}");
    }
}

#[test]
fn second_lan_cut_and_restore() {
    let tb = Testbed::new("hb").unwrap();
    let d1 = tb.add_host("d1", "10.0.0.21/24").unwrap();
    let d2 = tb.add_host("d2", "10.0.0.22/24").unwrap();
    let hb = tb.add_lan("hb").unwrap();
    assert_eq!(hb.bridge(), "br1");
    assert_eq!(tb.lan_named("hb"), Some(hb.clone()));
    assert!(tb.add_lan("hb").is_err());
    assert!(tb.add_host("d1", "10.0.0.23/24").is_err());
    d1.attach(&hb, "eth1", "10.9.0.1/30").unwrap();
    d2.attach(&hb, "eth1", "10.9.0.2/30").unwrap();
    assert_eq!(d1.ip(), Ipv4Addr::new(10, 0, 0, 21), "primary address stays eth0's");
    d1.wait_ping("10.9.0.2", REACH).unwrap();
    d1.wait_ping("10.0.0.22", REACH).unwrap();

    tb.cut(&d1, "eth1").unwrap();
    assert_ne!(d1.operstate("eth1").unwrap(), "UP");
    assert!(d1.ping("10.9.0.2").is_err(), "the heartbeat link is cut");
    assert!(d2.ping("10.9.0.1").is_err(), "the heartbeat link is cut, both ways");
    d1.wait_ping("10.0.0.22", REACH).unwrap();
    let addrs = d1.ip_cmd(&["-4", "addr", "show", "dev", "eth1"]).unwrap();
    assert!(addrs.contains("10.9.0.1/30"), "the cut keeps the host's address: {addrs}");

    tb.restore(&d1, "eth1").unwrap();
    d1.wait_ping("10.9.0.2", T).unwrap();
    d2.wait_ping("10.9.0.1", REACH).unwrap();

    // Cutting the main LAN of one host leaves the heartbeat link alone.
    d2.cut("eth0").unwrap();
    assert!(d1.ping("10.0.0.22").is_err());
    d1.wait_ping("10.9.0.2", REACH).unwrap();
    d2.restore("eth0").unwrap();
    d1.wait_ping("10.0.0.22", T).unwrap();
    assert!(d1.cut("eth7").is_err());
}

#[test]
fn host_configuration_helpers() {
    let tb = Testbed::new("cfg").unwrap();
    let h = tb.add_host("h", "10.0.0.31/24").unwrap();
    let peer = tb.add_host("peer", "10.0.0.32/24").unwrap();

    h.sysctl("net.ipv4.conf.all.arp_ignore", "1").unwrap();
    assert_eq!(h.read_sysctl("net.ipv4.conf.all.arp_ignore").unwrap(), "1");
    assert_eq!(peer.read_sysctl("net.ipv4.conf.all.arp_ignore").unwrap(), "0", "sysctls are per namespace");
    h.sysctl("net.ipv4.ip_forward", "1").unwrap();
    assert_eq!(h.read_sysctl("net.ipv4.ip_forward").unwrap(), "1");

    h.add_address("10.0.0.100/32", "lo").unwrap();
    assert!(h.ip_cmd(&["addr", "show", "dev", "lo"]).unwrap().contains("10.0.0.100/32"));
    h.del_address("10.0.0.100/32", "lo").unwrap();
    assert!(!h.ip_cmd(&["addr", "show", "dev", "lo"]).unwrap().contains("10.0.0.100/32"));
    assert!(h.add_address("nonsense", "lo").is_err());

    h.set_default_route("10.0.0.32").unwrap();
    assert!(h.ip_cmd(&["route", "show", "default"]).unwrap().contains("via 10.0.0.32 dev eth0"));
    h.add_route("192.168.77.0/24", Ipv4Addr::new(10, 0, 0, 32)).unwrap();
    assert!(h.ip_cmd(&["route", "show", "192.168.77.0/24"]).unwrap().contains("via 10.0.0.32"));

    // A bare host has only lo until attached.
    let bare = tb.add_bare_host("bare").unwrap();
    assert!(bare.mac().is_err());
    bare.attach(&tb.lan(), "eth0", "10.0.0.33/24").unwrap();
    assert_eq!(bare.ip(), Ipv4Addr::new(10, 0, 0, 33));
    bare.wait_ping(h.ip(), REACH).unwrap();
}

#[test]
fn spawn_guards_and_listening_waits() {
    let tb = Testbed::new("spawn").unwrap();
    let h = tb.add_host("h", "10.0.0.41/24").unwrap();

    // A plain Command is re-wrapped into the namespace, keeping its environment.
    let mut cmd = Command::new("sh");
    cmd.args(["-c", "echo \"marker=$FULCRUM_MARKER\"; exec sleep 1000"]).env("FULCRUM_MARKER", "xyz");
    let mut p = h.spawn(cmd).unwrap();
    p.wait_for_output("marker=xyz", T).unwrap();
    assert_eq!(
        run_command(Command::new("ip").args(["netns", "identify", &p.pid().to_string()])).unwrap().trim(),
        h.netns()
    );
    assert!(p.name().starts_with("sh@h"), "{}", p.name());
    let pid = p.pid();
    assert!(netns_pids(h.netns()).unwrap().contains(&pid));
    drop(p);
    assert!(!netns_pids(h.netns()).unwrap().contains(&pid), "the guard stopped the process on drop");

    // TCP / UDP listening waits on real sockets.
    let err = h.wait_tcp_listening(7000, Duration::from_millis(100)).unwrap_err();
    assert!(format!("{err:#}").contains("TCP listener on port 7000 in host h"), "{err:#}");
    let mut udp = h.command("python3");
    udp.args([
        "-c",
        "import socket, time\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\ns.bind(('0.0.0.0', 5999))\n\
         t = socket.socket()\nt.bind(('0.0.0.0', 7000))\nt.listen()\ntime.sleep(1000)\n",
    ]);
    let mut listener = h.spawn(udp).unwrap();
    h.wait_udp_listening(5999, T).unwrap();
    h.wait_tcp_listening(7000, T).unwrap();
    assert!(!h.udp_listening(5998).unwrap());
    assert!(listener.is_running().unwrap());
    let status = listener.terminate(T).unwrap();
    assert_eq!(status.signal(), Some(15));
    assert!(!h.udp_listening(5999).unwrap());
}

#[test]
fn stale_namespaces_are_swept() {
    require_root();
    // A pid that is certainly dead: a child we ran and reaped.
    let mut child = Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let stale = format!("fu{dead}x0-sw-stale");
    // Our own pid: alive, so every sweeper (ours and other processes') must keep it; swept after a crash.
    let alive = format!("fu{}x999999-keep", std::process::id());
    struct Cleanup(Vec<String>);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            for ns in &self.0 {
                let _ = destroy_netns(ns);
            }
        }
    }
    let _cleanup = Cleanup(vec![stale.clone(), alive.clone()]);
    // A concurrent sweeper may delete the half-created namespace under `ip netns add`: retry.
    wait_until("`ip netns add` of the stale namespace to succeed", T, MS10, || {
        run_command(Command::new("ip").args(["netns", "add", &stale])).map(|_| true)
    })
    .unwrap();
    run_command(Command::new("ip").args(["netns", "add", &alive])).unwrap();
    let mut inside = Command::new("ip").args(["netns", "exec", &stale, "sleep", "1000"]).spawn().unwrap();
    // Any concurrent Testbed::new (another test thread or test process) may sweep it at any moment.
    let observed_inside = wait_until("sleep to run inside the stale namespace (or it to be swept)", T, MS10, || {
        if !netns_exists(&stale) {
            return Ok(Some(false));
        }
        Ok(netns_pids(&stale)?.contains(&inside.id()).then_some(true))
    })
    .unwrap();

    sweep_stale_namespaces().unwrap();
    assert!(!netns_exists(&stale), "stale namespace {stale} was not swept");
    assert!(netns_exists(&alive), "namespace of a live pid must be kept");
    let status = inside.wait().unwrap();
    if observed_inside {
        assert_eq!(status.signal(), Some(9), "the process inside the stale namespace must be killed: {status}");
    } else {
        assert!(!status.success(), "{status}");
    }
    destroy_netns(&alive).unwrap();
    assert!(!netns_exists(&alive));
    destroy_netns(&alive).unwrap(); // idempotent
}

#[test]
fn workspace_bin_reports_how_to_build() {
    let err = try_workspace_bin("fulcrum-no-such-binary").unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("cargo build --workspace") && msg.contains("fulcrum-no-such-binary"), "{msg}");
    let panic = std::panic::catch_unwind(|| workspace_bin("fulcrum-no-such-binary")).unwrap_err();
    let text = panic.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(text.contains("cargo build --workspace"), "{text}");
}

#[test]
fn random_files_are_deterministic() {
    let d = tempfile::tempdir().unwrap();
    let (a, b, c) = (d.path().join("a"), d.path().join("b"), d.path().join("c"));
    write_random_file(&a, 100_003, 7).unwrap();
    write_random_file(&b, 100_003, 7).unwrap();
    write_random_file(&c, 100_003, 8).unwrap();
    assert_eq!(std::fs::metadata(&a).unwrap().len(), 100_003);
    assert_eq!(sha256_file(&a).unwrap(), sha256_file(&b).unwrap());
    assert_ne!(sha256_file(&a).unwrap(), sha256_file(&c).unwrap());
}

#[test]
fn medians() {
    assert_eq!(median(vec![]), None);
    assert_eq!(median(vec![3.0]), Some(3.0));
    assert_eq!(median(vec![5.0, 1.0, 3.0]), Some(3.0));
    assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), Some(2.5));
}
