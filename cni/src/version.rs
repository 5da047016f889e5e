//! CNI spec versions strait speaks, and what each one changes in what the plugin may do or must
//! print.

use std::fmt;

/// A CNI spec version strait-cni accepts in a configuration's `cniVersion`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SpecVersion {
    V0_3_0,
    V0_3_1,
    V0_4_0,
    V1_0_0,
    V1_1_0,
}

impl SpecVersion {
    /// Oldest first, as `VERSION` lists them.
    pub const SUPPORTED: [Self; 5] =
        [Self::V0_3_0, Self::V0_3_1, Self::V0_4_0, Self::V1_0_0, Self::V1_1_0];
    pub const NEWEST: Self = Self::V1_1_0;

    pub fn parse(text: &str) -> Option<Self> {
        Self::SUPPORTED.into_iter().find(|version| version.as_str() == text)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::V0_3_0 => "0.3.0",
            Self::V0_3_1 => "0.3.1",
            Self::V0_4_0 => "0.4.0",
            Self::V1_0_0 => "1.0.0",
            Self::V1_1_0 => "1.1.0",
        }
    }

    pub(crate) fn supported_list() -> String {
        Self::SUPPORTED.map(Self::as_str).join(", ")
    }

    /// CHECK arrived with spec 0.4.0.
    pub fn has_check(self) -> bool {
        self >= Self::V0_4_0
    }

    /// STATUS and GC arrived with spec 1.1.0.
    pub fn has_status_and_gc(self) -> bool {
        self >= Self::V1_1_0
    }

    /// Results before 1.0.0 carry `"version": "4"` in each `ips` entry; 1.0.0 removed it.
    pub fn ips_carry_version(self) -> bool {
        self < Self::V1_0_0
    }

    /// Spec 1.1.0 added `mtu` to result interfaces.
    pub fn interfaces_carry_mtu(self) -> bool {
        self >= Self::V1_1_0
    }
}

impl fmt::Display for SpecVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
