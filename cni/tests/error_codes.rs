//! Every well-known CNI error code strait-cni produces without root, through `handle`, the
//! same entry point the binary uses.

mod common;

use std::io;

use common::{TempDir, config, error_code, error_message, invoke};
use ipnet::Ipv4Net;
use serde_json::json;
use strait_cni::{
    error::{CniError, ErrorCode},
    invocation::{Attachment, Invocation},
    ipam::{IpamError, PodIpAllocator},
};

const ADD: [(&str, &str); 5] = [
    ("CNI_COMMAND", "ADD"),
    ("CNI_CONTAINERID", "c0ffee"),
    // Never a real namespace: tests that get past config checks use their own stand-ins.
    ("CNI_NETNS", "/run/netns/strait-t-unit-no-such-namespace"),
    ("CNI_IFNAME", "eth0"),
    ("CNI_PATH", "/usr/lib/cni"),
];

fn add_with(stdin: &str) -> strait_cni::Response {
    invoke(&ADD, stdin)
}

#[test]
fn unsupported_cni_version_is_code_1_and_lists_what_is_supported() {
    let data = TempDir::new("err1");
    let response = add_with(&config("2.0.0", "10.244.1.0/24", data.path()).to_string());
    assert_eq!(error_code(&response), 1);
    assert!(error_message(&response).contains("1.1.0"), "{}", error_message(&response));
    assert!(error_message(&response).contains("\"2.0.0\""));
}

#[test]
fn check_under_a_0_3_config_is_code_1_because_check_arrived_in_0_4() {
    let data = TempDir::new("err1b");
    let mut env = ADD.to_vec();
    env[0] = ("CNI_COMMAND", "CHECK");
    let response = invoke(&env, &config("0.3.1", "10.244.1.0/24", data.path()).to_string());
    assert_eq!(error_code(&response), 1);
    // The error object speaks the version the runtime asked in.
    assert_eq!(response.stdout.as_ref().unwrap()["cniVersion"], "0.3.1");
}

#[test]
fn gc_and_status_under_a_1_0_config_are_code_1() {
    let data = TempDir::new("err1c");
    let stdin = config("1.0.0", "10.244.1.0/24", data.path()).to_string();
    for verb in ["GC", "STATUS"] {
        let response = invoke(&[("CNI_COMMAND", verb), ("CNI_PATH", "/usr/lib/cni")], &stdin);
        assert_eq!(error_code(&response), 1, "{verb}");
        assert!(error_message(&response).contains("1.1.0"), "{verb}: {}", error_message(&response));
    }
}

#[test]
fn foreign_ipam_type_is_code_2_naming_key_and_value() {
    let data = TempDir::new("err2");
    let mut stdin = config("1.1.0", "10.244.1.0/24", data.path());
    stdin["ipam"]["type"] = json!("host-local");
    let response = add_with(&stdin.to_string());
    assert_eq!(error_code(&response), 2);
    let message = error_message(&response);
    assert!(message.contains("ipam.type") && message.contains("host-local"), "{message}");
}

#[test]
fn unknown_ipam_key_is_code_2() {
    let data = TempDir::new("err2b");
    let mut stdin = config("1.1.0", "10.244.1.0/24", data.path());
    stdin["ipam"]["rangeStart"] = json!("10.244.1.10");
    let response = add_with(&stdin.to_string());
    assert_eq!(error_code(&response), 2);
    assert!(error_message(&response).contains("ipam.rangeStart"));
}

#[test]
fn unknown_top_level_keys_are_accepted() {
    let data = TempDir::new("ok-extra");
    let mut stdin = config("1.1.0", "10.244.1.0/24", data.path());
    stdin["runtimeConfig"] = json!({ "portMappings": [] });
    stdin["args"] = json!({ "labels": { "app": "web" } });
    let response = invoke(&[("CNI_COMMAND", "STATUS")], &stdin.to_string());
    assert!(response.success, "{:?}", response.stdout);
    assert_eq!(response.stdout, None, "STATUS prints nothing on success");
}

#[test]
fn missing_pod_namespace_is_code_3_and_allocates_nothing() {
    let data = TempDir::new("err3");
    let mut env = ADD.to_vec();
    env[2] = ("CNI_NETNS", "/run/netns/strait-t-this-namespace-does-not-exist");
    let response = invoke(&env, &config("1.1.0", "10.244.1.0/24", data.path()).to_string());
    assert_eq!(error_code(&response), 3);
    let allocator =
        PodIpAllocator::new(data.path(), "strait-test", "10.244.1.0/24".parse().unwrap());
    assert_eq!(allocator.allocations().unwrap(), vec![]);
}

#[test]
fn missing_or_bad_environment_is_code_4_naming_the_variable() {
    let data = TempDir::new("err4");
    let stdin = config("1.1.0", "10.244.1.0/24", data.path()).to_string();
    let cases: Vec<(Vec<(&str, &str)>, &str)> = vec![
        (ADD[1..].to_vec(), "CNI_COMMAND"),
        (vec![("CNI_COMMAND", "ATTACH")], "CNI_COMMAND"),
        (ADD.iter().copied().filter(|(k, _)| *k != "CNI_CONTAINERID").collect(), "CNI_CONTAINERID"),
        (ADD.iter().copied().filter(|(k, _)| *k != "CNI_NETNS").collect(), "CNI_NETNS"),
        (ADD.iter().copied().filter(|(k, _)| *k != "CNI_IFNAME").collect(), "CNI_IFNAME"),
        (
            ADD.iter()
                .map(|&(k, v)| if k == "CNI_CONTAINERID" { (k, "-starts-badly") } else { (k, v) })
                .collect(),
            "CNI_CONTAINERID",
        ),
        (
            ADD.iter()
                .map(
                    |&(k, v)| if k == "CNI_IFNAME" { (k, "a-name-longer-than-15") } else { (k, v) },
                )
                .collect(),
            "CNI_IFNAME",
        ),
        (
            ADD.iter()
                .map(|&(k, v)| if k == "CNI_IFNAME" { (k, "eth:0") } else { (k, v) })
                .collect(),
            "CNI_IFNAME",
        ),
        (vec![("CNI_COMMAND", "GC")], "CNI_PATH"),
    ];
    for (env, variable) in cases {
        let response = invoke(&env, &stdin);
        assert_eq!(error_code(&response), 4, "{env:?}");
        assert!(
            error_message(&response).contains(variable),
            "{env:?}: {}",
            error_message(&response)
        );
    }
}

#[test]
fn del_does_not_need_cni_netns_but_add_and_check_do() {
    // Checked on the parsed invocation: running DEL here would reach the netlink step in
    // whatever namespace the test runs in.
    let env = |verb: &'static str| {
        move |name: &str| match name {
            "CNI_COMMAND" => Some(verb.to_owned()),
            "CNI_CONTAINERID" => Some("c0ffee".to_owned()),
            "CNI_IFNAME" => Some("eth0".to_owned()),
            _ => None,
        }
    };
    let del = Invocation::from_lookup(env("DEL")).expect("DEL without CNI_NETNS is valid");
    assert_eq!(del.netns, None);
    for verb in ["ADD", "CHECK"] {
        let error = Invocation::from_lookup(env(verb)).expect_err("needs CNI_NETNS");
        assert_eq!(error.code(), ErrorCode::INVALID_ENVIRONMENT, "{verb}");
        assert!(error.to_string().contains("CNI_NETNS"), "{verb}: {error}");
    }
}

#[test]
fn unreadable_stdin_is_code_5() {
    let env: std::collections::HashMap<&str, &str> = ADD.into_iter().collect();
    let response = strait_cni::handle(
        |name| env.get(name).map(|value| (*value).to_owned()),
        Err(io::Error::other("stdin closed")),
    );
    assert_eq!(common::error_code(&response), 5);
}

#[test]
fn malformed_json_is_code_6() {
    for stdin in ["{", "", "{\"cniVersion\": \"1.1.0\",}", "not json"] {
        let response = add_with(stdin);
        assert_eq!(error_code(&response), 6, "{stdin:?}");
    }
}

#[test]
fn invalid_network_configs_are_code_7_with_a_hint() {
    let data = TempDir::new("err7");
    let base = config("1.1.0", "10.244.1.0/24", data.path());
    let mut cases = Vec::new();
    let mut no_version = base.clone();
    no_version.as_object_mut().unwrap().remove("cniVersion");
    cases.push((no_version, "cniVersion"));
    let mut no_ipam = base.clone();
    no_ipam.as_object_mut().unwrap().remove("ipam");
    cases.push((no_ipam, "ipam"));
    let mut no_subnet = base.clone();
    no_subnet["ipam"].as_object_mut().unwrap().remove("subnet");
    cases.push((no_subnet, "ipam.subnet"));
    let mut bad_subnet = base.clone();
    bad_subnet["ipam"]["subnet"] = json!("10.244.1.0/33");
    cases.push((bad_subnet, "ipam.subnet"));
    let mut host_bits = base.clone();
    host_bits["ipam"]["subnet"] = json!("10.244.1.7/24");
    cases.push((host_bits, "10.244.1.0/24"));
    let mut tiny = base.clone();
    tiny["ipam"]["subnet"] = json!("10.244.1.0/31");
    cases.push((tiny, "/30"));
    let mut relative = base.clone();
    relative["ipam"]["dataDir"] = json!("var/lib/strait");
    cases.push((relative, "absolute"));
    let mut mtu = base.clone();
    mtu["mtu"] = json!(40);
    cases.push((mtu, "mtu"));
    let mut name = base.clone();
    name["name"] = json!("../escape");
    cases.push((name, "network name"));
    let mut no_type = base.clone();
    no_type.as_object_mut().unwrap().remove("type");
    cases.push((no_type, "type"));
    cases.push((json!(["not", "an", "object"]), "object"));
    for (stdin, hint) in cases {
        let response = add_with(&stdin.to_string());
        assert_eq!(error_code(&response), 7, "{stdin}");
        assert!(error_message(&response).contains(hint), "{stdin}: {}", error_message(&response));
    }
}

#[test]
fn a_locked_address_store_becomes_code_11_try_again_later() {
    let data = TempDir::new("err11");
    let allocator = PodIpAllocator::new(data.path(), "net", "10.244.1.0/24".parse().unwrap());
    allocator.allocations().unwrap(); // creates the store
    let lock = std::fs::File::open(data.path().join("net/lock")).unwrap();
    // SAFETY: flock on a descriptor this test owns.
    assert_eq!(unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) }, 0);
    let waiting = allocator.with_lock_wait(std::time::Duration::from_millis(200));
    let owner = Attachment { container_id: "c".into(), ifname: "eth0".into() };
    let error = waiting.allocate(&owner).expect_err("the store is locked");
    assert!(matches!(error, IpamError::LockTimeout { .. }), "{error}");
    assert_eq!(CniError::from(error).code(), ErrorCode::TRY_AGAIN_LATER);
    drop(lock);
    assert!(waiting.allocate(&owner).is_ok(), "the store is usable once the lock is gone");
}

#[test]
fn status_is_code_50_when_the_subnet_is_full() {
    let data = TempDir::new("err50");
    let stdin = config("1.1.0", "10.244.1.0/30", data.path()).to_string();
    let status = [("CNI_COMMAND", "STATUS")];
    assert!(invoke(&status, &stdin).success, "an empty /30 has one free address");
    let subnet: Ipv4Net = "10.244.1.0/30".parse().unwrap();
    let allocator = PodIpAllocator::new(data.path(), "strait-test", subnet);
    allocator.allocate(&Attachment { container_id: "a".into(), ifname: "eth0".into() }).unwrap();
    let response = invoke(&status, &stdin);
    assert_eq!(error_code(&response), 50);
    assert!(error_message(&response).contains("10.244.1.0/30"), "{}", error_message(&response));
}

#[test]
fn status_is_code_50_when_the_data_dir_is_unusable_or_pins_are_missing() {
    let data = TempDir::new("err50b");
    let file = data.path().join("a-file");
    std::fs::write(&file, "not a directory").unwrap();
    let stdin = config("1.1.0", "10.244.1.0/24", &file).to_string();
    let response = invoke(&[("CNI_COMMAND", "STATUS")], &stdin);
    assert_eq!(error_code(&response), 50);
    assert!(error_message(&response).contains("address store"), "{}", error_message(&response));

    let mut stdin = config("1.1.0", "10.244.1.0/24", data.path());
    stdin["antiSpoof"] = json!({ "pinDir": data.path().join("no-pins-here") });
    let response = invoke(&[("CNI_COMMAND", "STATUS")], &stdin.to_string());
    assert_eq!(error_code(&response), 50);
    assert!(error_message(&response).contains("agent"), "{}", error_message(&response));
}

#[test]
fn exhausted_subnet_is_code_100_saying_which_range_and_how_full() {
    let data = TempDir::new("err100");
    let subnet: Ipv4Net = "10.244.7.0/30".parse().unwrap();
    let allocator = PodIpAllocator::new(data.path(), "strait-test", subnet);
    allocator
        .allocate(&Attachment { container_id: "first".into(), ifname: "eth0".into() })
        .unwrap();
    // A plain file stands in for the pod's namespace: it opens, so ADD gets as far as the
    // allocation, but no netlink request could ever land anywhere with it.
    let not_a_namespace = data.path().join("not-a-namespace");
    std::fs::write(&not_a_namespace, "").unwrap();
    let netns = not_a_namespace.to_string_lossy().into_owned();
    let env: Vec<_> = ADD
        .iter()
        .map(|&(k, v)| if k == "CNI_NETNS" { (k, netns.as_str()) } else { (k, v) })
        .collect();
    let response = invoke(&env, &config("1.1.0", "10.244.7.0/30", data.path()).to_string());
    assert_eq!(error_code(&response), 100);
    let message = error_message(&response);
    assert!(message.contains("10.244.7.0/30") && message.contains("1 of 1"), "{message}");
}

#[test]
fn error_objects_carry_version_code_msg_and_details() {
    let response = add_with("{");
    let stdout = response.stdout.unwrap();
    assert_eq!(stdout["cniVersion"], "1.1.0");
    assert_eq!(stdout["code"], 6);
    assert!(stdout["msg"].as_str().is_some_and(|msg| !msg.is_empty()));
    assert!(stdout["details"].as_str().is_some_and(|details| details.contains("EOF")), "{stdout}");
}
