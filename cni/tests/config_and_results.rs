//! Configuration parsing, version negotiation, VERSION, and the ADD result per spec version.

mod common;

use std::{net::Ipv4Addr, path::Path};

use common::{TempDir, config, invoke};
use serde_json::json;
use strait_cni::{
    config::{self, DEFAULT_DATA_DIR, DEFAULT_MTU, NetworkConfig},
    result::{AttachmentResult, POD_GATEWAY, previous_attachment},
    version::SpecVersion,
};

fn parse(value: serde_json::Value) -> NetworkConfig {
    let document = config::parse_document(value.to_string().as_bytes()).expect("an object");
    let version = config::declared_version(&document).expect("a known version");
    NetworkConfig::from_document(document, version).expect("a valid config")
}

#[test]
fn a_full_config_parses_with_every_field() {
    let parsed = parse(json!({
        "cniVersion": "1.1.0", "name": "strait", "type": "strait-cni", "mtu": 9000,
        "ipam": { "type": "strait", "subnet": "10.244.1.0/24", "dataDir": "/var/lib/strait/cni" },
        "antiSpoof": { "pinDir": "/sys/fs/bpf/strait/lab/node-1" },
    }));
    assert_eq!(parsed.version, SpecVersion::V1_1_0);
    assert_eq!(parsed.name, "strait");
    assert_eq!(parsed.mtu, 9000);
    assert_eq!(parsed.ipam.subnet, "10.244.1.0/24".parse().unwrap());
    assert_eq!(parsed.ipam.data_dir, Path::new("/var/lib/strait/cni"));
    assert_eq!(parsed.anti_spoof.unwrap().pin_dir, Path::new("/sys/fs/bpf/strait/lab/node-1"));
}

#[test]
fn optional_fields_take_their_defaults() {
    let parsed = parse(json!({
        "cniVersion": "0.4.0", "name": "strait", "type": "strait-cni",
        "ipam": { "subnet": "10.244.1.0/24" },
    }));
    assert_eq!(parsed.mtu, DEFAULT_MTU);
    assert_eq!(parsed.ipam.data_dir, Path::new(DEFAULT_DATA_DIR));
    assert_eq!(parsed.anti_spoof, None);
    assert_eq!(parsed.prev_result, None);
}

#[test]
fn a_conflist_element_with_prev_result_and_runtime_keys_parses() {
    let parsed = parse(json!({
        "cniVersion": "1.0.0", "name": "strait", "type": "strait-cni",
        "ipam": { "subnet": "10.244.1.0/24" },
        "runtimeConfig": { "bandwidth": {} }, "capabilities": {}, "args": { "cni": {} },
        "prevResult": { "cniVersion": "1.0.0", "ips": [] },
    }));
    assert_eq!(parsed.prev_result, Some(json!({ "cniVersion": "1.0.0", "ips": [] })));
}

#[test]
fn gc_attachments_are_read_from_either_key() {
    for key in ["cni.dev/valid-attachments", "cni.dev/attachments"] {
        let mut value = json!({
            "cniVersion": "1.1.0", "name": "strait", "type": "strait-cni",
            "ipam": { "subnet": "10.244.1.0/24" },
        });
        value[key] = json!([{ "containerID": "abc", "ifname": "eth0" }]);
        let listed = parse(value).valid_attachments.expect("listed");
        assert_eq!(listed.len(), 1, "{key}");
        assert_eq!(listed[0].container_id, "abc");
        assert_eq!(listed[0].ifname, "eth0");
    }
}

#[test]
fn every_supported_version_is_accepted_and_others_are_not() {
    for version in ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"] {
        let document =
            config::parse_document(json!({ "cniVersion": version }).to_string().as_bytes())
                .unwrap();
        let parsed = config::declared_version(&document).expect(version);
        assert_eq!(parsed.as_str(), version);
    }
    for version in ["0.1.0", "0.2.0", "1.2.0", "1.1", "latest"] {
        let document =
            config::parse_document(json!({ "cniVersion": version }).to_string().as_bytes())
                .unwrap();
        let error = config::declared_version(&document).expect_err(version);
        assert_eq!(error.code().0, 1, "{version}");
    }
}

#[test]
fn cni_versions_list_negotiates_the_newest_shared_version() {
    let document = config::parse_document(
        json!({ "cniVersions": ["0.4.0", "1.0.0", "9.9.9"] }).to_string().as_bytes(),
    )
    .unwrap();
    assert_eq!(config::declared_version(&document).unwrap(), SpecVersion::V1_0_0);
}

#[test]
fn version_verb_lists_supported_versions_in_the_asked_version() {
    let response = invoke(&[("CNI_COMMAND", "VERSION")], r#"{"cniVersion":"0.4.0"}"#);
    assert!(response.success);
    let stdout = response.stdout.unwrap();
    assert_eq!(stdout["cniVersion"], "0.4.0");
    assert_eq!(stdout["supportedVersions"], json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]));

    let response = invoke(&[("CNI_COMMAND", "VERSION")], "");
    assert_eq!(response.stdout.unwrap()["cniVersion"], "1.1.0");
}

fn sample_result() -> AttachmentResult {
    AttachmentResult {
        host_ifname: "st0123456789a".into(),
        host_mac: [0x02, 0, 0, 0, 0, 1],
        pod_ifname: "eth0".into(),
        pod_mac: [0x02, 0, 0, 0, 0, 2],
        sandbox: "/run/netns/pod".into(),
        pod_ip: Ipv4Addr::new(10, 244, 1, 7),
        mtu: 1450,
    }
}

#[test]
fn results_before_1_0_carry_ip_version_4() {
    for version in [SpecVersion::V0_3_0, SpecVersion::V0_3_1, SpecVersion::V0_4_0] {
        let result = sample_result().to_json(version);
        assert_eq!(result["cniVersion"], version.as_str());
        assert_eq!(result["ips"][0]["version"], "4", "{version}");
        assert!(result["interfaces"][1].get("mtu").is_none(), "{version}");
    }
}

#[test]
fn results_from_1_0_drop_ip_version_and_1_1_adds_interface_mtu() {
    let v1_0 = sample_result().to_json(SpecVersion::V1_0_0);
    assert!(v1_0["ips"][0].get("version").is_none());
    assert!(v1_0["interfaces"][1].get("mtu").is_none());
    let v1_1 = sample_result().to_json(SpecVersion::V1_1_0);
    assert!(v1_1["ips"][0].get("version").is_none());
    assert_eq!(v1_1["interfaces"][1]["mtu"], 1450);
}

#[test]
fn result_describes_both_veth_ends_the_pod_address_and_its_gateway() {
    let result = sample_result().to_json(SpecVersion::V1_1_0);
    assert_eq!(result["interfaces"][0]["name"], "st0123456789a");
    assert!(result["interfaces"][0].get("sandbox").is_none(), "the host end has no sandbox");
    assert_eq!(result["interfaces"][1]["name"], "eth0");
    assert_eq!(result["interfaces"][1]["mac"], "02:00:00:00:00:02");
    assert_eq!(result["interfaces"][1]["sandbox"], "/run/netns/pod");
    assert_eq!(result["ips"][0]["address"], "10.244.1.7/32");
    assert_eq!(result["ips"][0]["interface"], 1);
    assert_eq!(result["ips"][0]["gateway"], POD_GATEWAY.to_string());
    assert_eq!(result["routes"], json!([{ "dst": "0.0.0.0/0", "gw": "169.254.1.1" }]));
    assert_eq!(result["dns"], json!({}));
}

#[test]
fn prev_result_of_every_version_yields_the_pod_address() {
    for version in SpecVersion::SUPPORTED {
        let prev = sample_result().to_json(version);
        let found = previous_attachment(&prev, "eth0", Some(Path::new("/run/netns/pod")))
            .unwrap_or_else(|e| panic!("{version}: {e}"));
        assert_eq!(found.pod_ip, Ipv4Addr::new(10, 244, 1, 7), "{version}");
        let other_netns = previous_attachment(&prev, "eth0", Some(Path::new("/run/netns/x")));
        assert!(other_netns.is_err(), "{version}: a different sandbox must not match");
        assert!(previous_attachment(&prev, "eth1", None).is_err(), "{version}: wrong ifname");
    }
}

#[test]
fn status_succeeds_on_a_fresh_store() {
    let data = TempDir::new("status-ok");
    let response = invoke(
        &[("CNI_COMMAND", "STATUS")],
        &config("1.1.0", "10.244.1.0/24", data.path()).to_string(),
    );
    assert!(response.success, "{:?}", response.stdout);
}
