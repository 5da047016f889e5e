//! The anti-spoofing tc program: loading and pinning, re-adoption of pinned maps, every verdict
//! through BPF_PROG_TEST_RUN, and the whole path through strait-cni with a pod that lies about
//! its source. Needs root; pins live under `/sys/fs/bpf/strait/t-…/` and go on drop.

mod support;

use std::{
    net::{Ipv4Addr, UdpSocket},
    os::fd::{AsFd as _, AsRawFd as _},
    path::Path,
    time::Duration,
};

use aya::{
    maps::{HashMap, Map, MapData},
    programs::SchedClassifier,
};
use serde_json::json;
use strait_cni::{invocation::Attachment, naming::host_veth_name};
use strait_common::antispoof::{DROP_STATS_MAP, ENDPOINTS_MAP, PodEndpoint};
use strait_dataplane::ebpf::antispoof::{self, AntiSpoof, PROGRAM_PIN, STAGED_PROGRAM_PIN};
use support::{DirGuard, NamespaceGuard, privileged};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const LOOPBACK_IFINDEX: u32 = 1;
const POD_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 7);

/// `union bpf_attr`'s member for BPF_PROG_TEST_RUN (include/uapi/linux/bpf.h).
#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

const BPF_PROG_TEST_RUN: libc::c_long = 10;
/// `struct __sk_buff` is 192 bytes; `ifindex` is its 11th `u32`.
const SK_BUFF_WORDS: usize = 48;
const SK_BUFF_IFINDEX_WORD: usize = 10;

/// Runs the program once on `packet` as if it arrived on `ifindex`; returns its verdict. The
/// kernel builds an skb around the bytes and sends nothing anywhere.
fn test_run(program_fd: i32, packet: &[u8], ifindex: u32) -> u32 {
    let mut ctx = [0u32; SK_BUFF_WORDS];
    ctx[SK_BUFF_IFINDEX_WORD] = ifindex;
    let mut attr = TestRunAttr {
        prog_fd: program_fd as u32,
        data_size_in: packet.len() as u32,
        data_in: packet.as_ptr() as u64,
        repeat: 1,
        ctx_size_in: std::mem::size_of_val(&ctx) as u32,
        ctx_in: ctx.as_ptr() as u64,
        ..Default::default()
    };
    // SAFETY: attr points at live buffers of the sizes given, for the duration of the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_TEST_RUN,
            &mut attr as *mut TestRunAttr,
            std::mem::size_of::<TestRunAttr>() as u32,
        )
    };
    assert_eq!(rc, 0, "BPF_PROG_TEST_RUN: {}", std::io::Error::last_os_error());
    attr.retval
}

fn ethernet(ethertype: u16) -> Vec<u8> {
    let mut frame = vec![0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02];
    frame.extend_from_slice(&ethertype.to_be_bytes());
    frame
}

/// An Ethernet frame with an IPv4/UDP packet from `source`, with `option_words` 32-bit words
/// of IP options (NOPs), so IHL = 5 + option_words.
fn ipv4_packet(source: Ipv4Addr, option_words: u8) -> Vec<u8> {
    let mut frame = ethernet(0x0800);
    let header_len = 20 + usize::from(option_words) * 4;
    let total = (header_len + 8) as u16;
    frame.push(0x40 | (5 + option_words));
    frame.push(0);
    frame.extend_from_slice(&total.to_be_bytes());
    frame.extend_from_slice(&[0, 0, 0x40, 0, 64, 17, 0, 0]);
    frame.extend_from_slice(&source.octets());
    frame.extend_from_slice(&[10, 244, 1, 9]);
    frame.extend(std::iter::repeat_n(1u8, usize::from(option_words) * 4));
    frame.extend_from_slice(&[0x30, 0x39, 0x00, 0x35, 0, 8, 0, 0]);
    frame
}

/// An Ethernet/IPv4 ARP request from `sender`.
fn arp_packet(sender: Ipv4Addr) -> Vec<u8> {
    let mut frame = ethernet(0x0806);
    frame.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 1]);
    frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02]);
    frame.extend_from_slice(&sender.octets());
    frame.extend_from_slice(&[0; 6]);
    frame.extend_from_slice(&[10, 244, 1, 1]);
    frame
}

fn ipv6_packet() -> Vec<u8> {
    let mut frame = ethernet(0x86dd);
    frame.extend_from_slice(&[0x60, 0, 0, 0, 0, 8, 17, 64]);
    frame.extend_from_slice(&[0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    frame.extend_from_slice(&[0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
    frame.extend_from_slice(&[0, 1, 0, 2, 0, 8, 0, 0]);
    frame
}

fn endpoints(pin_dir: &Path) -> HashMap<MapData, u32, PodEndpoint> {
    let map = MapData::from_pin(pin_dir.join(ENDPOINTS_MAP)).expect("opening the pinned map");
    HashMap::try_from(Map::HashMap(map)).expect("the endpoint map")
}

fn set_endpoint(pin_dir: &Path, ifindex: u32, ip: Ipv4Addr) {
    let entry = PodEndpoint { ipv4: u32::from_ne_bytes(ip.octets()), _pad: 0 };
    endpoints(pin_dir).insert(ifindex, entry, 0).expect("writing an endpoint");
}

fn drop_count(pin_dir: &Path, reason: &str) -> u64 {
    antispoof::drop_counts(pin_dir)
        .expect("reading drop counters")
        .into_iter()
        .find(|(name, _)| *name == reason)
        .map(|(_, count)| count)
        .unwrap_or_else(|| panic!("no counter {reason}"))
}

/// Waits (briefly) for a counter to reach `expected`: a frame sent into a veth is processed
/// by the receiving side's softirq, not necessarily before the send returns.
fn wait_for_count(pin_dir: &Path, reason: &str, expected: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    loop {
        let count = drop_count(pin_dir, reason);
        if count == expected {
            return;
        }
        assert!(count < expected, "{reason}: {count} drops, expected {expected}");
        assert!(
            std::time::Instant::now() < deadline,
            "{reason}: stuck at {count}, expected {expected}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn load_pins_program_and_maps_and_a_reload_readopts_the_maps() {
    if !privileged("load_pins_program_and_maps_and_a_reload_readopts_the_maps") {
        return;
    }
    strait_dataplane::ebpf::ensure_bpffs().unwrap();
    let (_pins, pin_dir) = DirGuard::pins("antispoof-load");
    let first = AntiSpoof::load_and_pin(&pin_dir).expect("loading the program");
    for pin in [PROGRAM_PIN, ENDPOINTS_MAP, DROP_STATS_MAP] {
        assert!(pin_dir.join(pin).exists(), "{pin} is pinned");
    }
    set_endpoint(&pin_dir, 4242, POD_IP);
    drop(first);

    // The agent restarts: the new load adopts the pinned maps, entries and all.
    let _second = AntiSpoof::load_and_pin(&pin_dir).expect("reloading the program");
    assert_eq!(antispoof::endpoint(&pin_dir, 4242).unwrap(), Some(POD_IP));
    assert_eq!(antispoof::endpoint(&pin_dir, 4243).unwrap(), None);
    assert!(pin_dir.join(PROGRAM_PIN).exists());
    assert!(!pin_dir.join(STAGED_PROGRAM_PIN).exists(), "no staged pin is left");

    antispoof::forget_endpoint(&pin_dir, POD_IP).unwrap();
    assert_eq!(antispoof::endpoint(&pin_dir, 4242).unwrap(), None);
    antispoof::forget_interface(&pin_dir, 4242).expect("forgetting a missing entry succeeds");
}

#[test]
fn the_program_passes_a_pods_own_traffic_and_drops_everything_else() {
    if !privileged("the_program_passes_a_pods_own_traffic_and_drops_everything_else") {
        return;
    }
    strait_dataplane::ebpf::ensure_bpffs().unwrap();
    let (_pins, pin_dir) = DirGuard::pins("antispoof-verdicts");
    let _loaded = AntiSpoof::load_and_pin(&pin_dir).expect("loading the program");
    let program = SchedClassifier::from_pin(pin_dir.join(PROGRAM_PIN)).expect("pinned program");
    let fd = program.fd().expect("program fd").as_fd().as_raw_fd();
    set_endpoint(&pin_dir, LOOPBACK_IFINDEX, POD_IP);
    // Runs happen inside a test namespace, whose loopback is ifindex 1 like everyone's.
    let sandbox = NamespaceGuard::new("antispoof-run");

    let mut options_cut_short = ipv4_packet(POD_IP, 2);
    options_cut_short.truncate(14 + 24);
    let mut truncated_arp = arp_packet(POD_IP);
    truncated_arp.truncate(14 + 10);
    // (what, frame, verdict, counter that must go up by one)
    let pass = |name, frame| (name, frame, TC_ACT_OK, None);
    let shot = |name, frame, reason| (name, frame, TC_ACT_SHOT, Some(reason));
    let cases = [
        pass("own IPv4 source", ipv4_packet(POD_IP, 0)),
        shot(
            "spoofed IPv4 source",
            ipv4_packet(Ipv4Addr::new(10, 244, 1, 8), 0),
            "spoofed_ipv4_source",
        ),
        pass("IPv4 with options (IHL 6), own source", ipv4_packet(POD_IP, 1)),
        shot(
            "IPv4 with options (IHL 15), spoofed source",
            ipv4_packet(Ipv4Addr::new(192, 0, 2, 1), 10),
            "spoofed_ipv4_source",
        ),
        shot("IHL beyond the packet", options_cut_short, "malformed"),
        pass("ARP with own sender", arp_packet(POD_IP)),
        shot(
            "ARP with another sender",
            arp_packet(Ipv4Addr::new(10, 244, 1, 1)),
            "spoofed_arp_sender",
        ),
        pass("ARP probe (sender 0.0.0.0)", arp_packet(Ipv4Addr::UNSPECIFIED)),
        shot("truncated ARP", truncated_arp, "malformed"),
        shot("IPv6", ipv6_packet(), "unsupported_protocol"),
    ];
    for (name, packet, expected, counter) in cases {
        let before = counter.map(|reason| drop_count(&pin_dir, reason));
        let verdict = sandbox.ns().run(|| test_run(fd, &packet, LOOPBACK_IFINDEX)).unwrap();
        assert_eq!(verdict, expected, "{name}");
        if let (Some(reason), Some(before)) = (counter, before) {
            assert_eq!(drop_count(&pin_dir, reason), before + 1, "{name}: counter {reason}");
        }
    }

    // An interface without an entry fails closed.
    antispoof::forget_interface(&pin_dir, LOOPBACK_IFINDEX).unwrap();
    let before = drop_count(&pin_dir, "unknown_endpoint");
    let verdict = sandbox.ns().run(|| test_run(fd, &ipv4_packet(POD_IP, 0), LOOPBACK_IFINDEX));
    assert_eq!(verdict.unwrap(), TC_ACT_SHOT, "unknown ifindex");
    assert_eq!(drop_count(&pin_dir, "unknown_endpoint"), before + 1);
}

/// Sends one raw Ethernet frame out of interface `ifindex` of the calling thread's namespace
/// with an AF_PACKET socket: the way a pod could put any bytes on its link.
fn send_raw_frame(ifindex: u32, frame: &[u8]) -> std::io::Result<()> {
    use std::os::fd::{FromRawFd as _, OwnedFd};
    // SAFETY: plain socket(2); the descriptor is owned right away.
    let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: raw is a fresh descriptor nobody else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
    let mut address: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    address.sll_family = libc::AF_PACKET as u16;
    address.sll_ifindex = ifindex as i32;
    address.sll_halen = 6;
    address.sll_addr[..6].copy_from_slice(&frame[..6]);
    // SAFETY: the buffer and address outlive the call and their lengths are given.
    let sent = unsafe {
        libc::sendto(
            socket.as_raw_fd(),
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&raw const address).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if sent < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) }
}

#[test]
fn a_pod_sending_from_a_spoofed_source_is_dropped_and_counted() {
    if !privileged("a_pod_sending_from_a_spoofed_source_is_dropped_and_counted") {
        return;
    }
    strait_dataplane::ebpf::ensure_bpffs().unwrap();
    let (_pins, pin_dir) = DirGuard::pins("antispoof-e2e");
    let _agent = AntiSpoof::load_and_pin(&pin_dir).expect("loading the program");
    let node = NamespaceGuard::new("antispoof-node");
    node.ns().write_net_sysctl("ipv4/ip_forward", "1").unwrap();
    let data = DirGuard::temp("antispoof-data");
    let config = json!({
        "cniVersion": "1.1.0", "name": "strait-e2e", "type": "strait-cni",
        "ipam": { "subnet": "10.244.11.0/24", "dataDir": data.path() },
        "antiSpoof": { "pinDir": pin_dir },
    });
    let run =
        |verb: &str, id: &str, pod: &NamespaceGuard, extra: Option<(&str, serde_json::Value)>| {
            let mut config = config.clone();
            if let Some((key, value)) = extra {
                config[key] = value;
            }
            let output = node.run_cni(verb, id, &pod.path(), &config);
            let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
            (output.status.success(), stdout, String::from_utf8_lossy(&output.stderr).into_owned())
        };
    // A failed ADD leaves no endpoint entry behind.
    let squatted = NamespaceGuard::new("antispoof-squat");
    squatted.ip(&["link", "add", "eth0", "type", "veth", "peer", "name", "squatter"]);
    let (ok, out, _) = run("ADD", "pod-squat", &squatted, None);
    assert!(!ok && out.contains("\"code\":104"), "{out}");
    assert_eq!(endpoints(&pin_dir).keys().count(), 0, "no entry after a failed ADD");

    let pod_a = NamespaceGuard::new("antispoof-a");
    let pod_b = NamespaceGuard::new("antispoof-b");
    let (ok, added_a, err) = run("ADD", "pod-a", &pod_a, None);
    assert!(ok, "{added_a} {err}");
    let (ok, added_b, err) = run("ADD", "pod-b", &pod_b, None);
    assert!(ok, "{added_b} {err}");
    let ip_of = |result: &str| -> Ipv4Addr {
        let value: serde_json::Value = serde_json::from_str(result).unwrap();
        value["ips"][0]["address"].as_str().unwrap().trim_end_matches("/32").parse().unwrap()
    };
    let (ip_a, ip_b) = (ip_of(&added_a), ip_of(&added_b));
    let host_a =
        host_veth_name(&Attachment { container_id: "pod-a".into(), ifname: "eth0".into() });

    // ADD wrote the entry and hung the program on the host veth's ingress.
    let host_a_index: u32 =
        node.ip_json(&["link", "show", "dev", &host_a])[0]["ifindex"].as_u64().unwrap() as u32;
    assert_eq!(antispoof::endpoint(&pin_dir, host_a_index).unwrap(), Some(ip_a));
    let tc = node.command("tc").args(["filter", "show", "dev", &host_a, "ingress"]).output();
    let tc = String::from_utf8_lossy(&tc.unwrap().stdout).into_owned();
    assert!(tc.contains("antispoof"), "tc filter on {host_a}: {tc}");
    let tc = node.command("tc").args(["filter", "show", "dev", &host_a, "egress"]).output();
    let tc = String::from_utf8_lossy(&tc.unwrap().stdout).into_owned();
    assert!(tc.contains("to_pod"), "service reverse NAT on the egress of {host_a}: {tc}");

    pod_a.assert_route_stays_inside(&ip_b.to_string(), "eth0");
    node.assert_route_stays_inside(
        &ip_b.to_string(),
        &host_veth_name(&Attachment { container_id: "pod-b".into(), ifname: "eth0".into() }),
    );

    let receiver = pod_b.ns().run(|| UdpSocket::bind((ip_b, 0))).unwrap().unwrap();
    receiver.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let target = receiver.local_addr().unwrap();
    let send_from = |source: Ipv4Addr| {
        pod_a
            .ns()
            .run(|| -> std::io::Result<()> {
                let socket = UdpSocket::bind((source, 0))?;
                socket.send_to(b"who am i", target)?;
                Ok(())
            })
            .unwrap()
            .unwrap();
    };
    let receive = || {
        let mut buffer = [0u8; 64];
        receiver.recv_from(&mut buffer).ok().map(|(_, from)| from.ip())
    };

    send_from(ip_a);
    assert_eq!(receive(), Some(std::net::IpAddr::V4(ip_a)), "the pod's own source passes");

    let spoofed = Ipv4Addr::new(10, 244, 11, 200);
    pod_a.ip(&["addr", "add", &format!("{spoofed}/32"), "dev", "eth0"]);
    let before = drop_count(&pin_dir, "spoofed_ipv4_source");
    send_from(spoofed);
    assert_eq!(receive(), None, "a spoofed source must not arrive");
    wait_for_count(&pin_dir, "spoofed_ipv4_source", before + 1);

    // Frames no socket API would build: an IPv4 header cut short, and ARP claiming another
    // pod's address. (BPF_PROG_TEST_RUN refuses the first with EINVAL on this kernel, so it is
    // tested here, on the real hook.)
    let eth0_index =
        pod_a.ip_json(&["link", "show", "dev", "eth0"])[0]["ifindex"].as_u64().unwrap() as u32;
    let mut cut_short = ipv4_packet(ip_a, 0);
    cut_short.truncate(14 + 10);
    let raw_cases = [(cut_short, "malformed"), (arp_packet(ip_b), "spoofed_arp_sender")];
    for (frame, reason) in raw_cases {
        let before = drop_count(&pin_dir, reason);
        pod_a.ns().run(|| send_raw_frame(eth0_index, &frame)).unwrap().unwrap();
        wait_for_count(&pin_dir, reason, before + 1);
    }

    // CHECK notices a missing entry.
    antispoof::forget_interface(&pin_dir, host_a_index).unwrap();
    let (ok, out, _) = run(
        "CHECK",
        "pod-a",
        &pod_a,
        Some(("prevResult", serde_json::from_str(&added_a).unwrap())),
    );
    assert!(!ok, "CHECK must fail without the entry");
    assert!(out.contains("\"code\":101"), "{out}");

    // DEL removes the entries of pod B.
    let host_b_index: u32 = node.ip_json(&[
        "link",
        "show",
        "dev",
        &host_veth_name(&Attachment { container_id: "pod-b".into(), ifname: "eth0".into() }),
    ])[0]["ifindex"]
        .as_u64()
        .unwrap() as u32;
    assert_eq!(antispoof::endpoint(&pin_dir, host_b_index).unwrap(), Some(ip_b));
    let (ok, out, err) = run("DEL", "pod-b", &pod_b, None);
    assert!(ok, "{out} {err}");
    assert_eq!(antispoof::endpoint(&pin_dir, host_b_index).unwrap(), None);
}
