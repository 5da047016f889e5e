//! Host veth names: short enough for the kernel, stable across releases, distinct per
//! attachment.

use std::collections::HashSet;

use strait_cni::{
    invocation::Attachment,
    naming::{HOST_VETH_PREFIX, fnv1a_64, host_veth_name},
};

fn attachment(container_id: &str, ifname: &str) -> Attachment {
    Attachment { container_id: container_id.to_owned(), ifname: ifname.to_owned() }
}

#[test]
fn the_hash_is_fnv1a_64_as_published() {
    // Test vectors of the FNV reference: the empty string is the offset basis.
    assert_eq!(fnv1a_64(b""), 0xcbf2_9ce4_8422_2325);
    assert_eq!(fnv1a_64(b"a"), 0xaf63_dc4c_8601_ec8c);
    assert_eq!(fnv1a_64(b"foobar"), 0x8594_4171_f739_67e8);
}

#[test]
fn names_are_pinned_so_an_upgrade_finds_existing_veths() {
    // Written down once; if this changes, veths made by an older strait-cni become orphans.
    assert_eq!(host_veth_name(&attachment("c1", "eth0")), "stf53f02b3bfe");
}

#[test]
fn names_fit_ifnamsiz_and_carry_the_prefix() {
    let long_id = "f".repeat(64);
    let name = host_veth_name(&attachment(&long_id, "eth0"));
    assert!(name.len() <= 15, "{name}");
    assert!(name.starts_with(HOST_VETH_PREFIX));
    assert!(name[2..].chars().all(|c| c.is_ascii_hexdigit()), "{name}");
}

#[test]
fn names_differ_per_container_and_per_interface() {
    let mut names = HashSet::new();
    for n in 0..2000 {
        for ifname in ["eth0", "net1"] {
            assert!(names.insert(host_veth_name(&attachment(&format!("pod-{n}"), ifname))));
        }
    }
    // The separator keeps ("ab","c") apart from ("a","bc").
    assert_ne!(host_veth_name(&attachment("ab", "c")), host_veth_name(&attachment("a", "bc")));
}
