//! Explicit version negotiation.
//!
//! Every frame header carries the version its body is encoded in. The agent's first frame (the `Hello`) is
//! always a version-1 frame and lists the range of versions the agent speaks; the director picks the highest
//! version in both ranges and says so in its `Welcome`, or answers `Reject(UnsupportedVersion)`. Every later
//! frame on the connection, in both directions, uses the chosen version, and a frame in any other version is a
//! protocol error.

use bincode::{Decode, Encode};
use serde::{Deserialize, Serialize};

/// The newest protocol version this build speaks.
pub const PROTOCOL_VERSION: u16 = 1;
/// The oldest protocol version this build still speaks.
pub const MIN_PROTOCOL_VERSION: u16 = 1;
/// The version the `Hello` frame is always encoded in; its layout is frozen.
pub const HELLO_VERSION: u16 = 1;

/// An inclusive range of protocol versions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
pub struct VersionRange {
    pub min: u16,
    pub max: u16,
}

impl VersionRange {
    /// The versions this build speaks.
    pub const SUPPORTED: VersionRange = VersionRange { min: MIN_PROTOCOL_VERSION, max: PROTOCOL_VERSION };

    pub fn contains(self, version: u16) -> bool {
        (self.min..=self.max).contains(&version)
    }
}

/// There is no version both sides speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("no common protocol version: we speak {}..={}, the peer speaks {}..={}", ours.min, ours.max, theirs.min, theirs.max)]
pub struct NoCommonVersion {
    pub ours: VersionRange,
    pub theirs: VersionRange,
}

/// The highest version in both ranges.
pub fn negotiate(ours: VersionRange, theirs: VersionRange) -> Result<u16, NoCommonVersion> {
    let high = ours.max.min(theirs.max);
    let low = ours.min.max(theirs.min);
    if low <= high {
        Ok(high)
    } else {
        Err(NoCommonVersion { ours, theirs })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(min: u16, max: u16) -> VersionRange {
        VersionRange { min, max }
    }

    #[test]
    fn picks_the_highest_common_version() {
        assert_eq!(negotiate(range(1, 3), range(2, 5)), Ok(3));
        assert_eq!(negotiate(range(1, 1), range(1, 1)), Ok(1));
        assert_eq!(negotiate(range(2, 4), range(1, 2)), Ok(2));
    }

    #[test]
    fn disjoint_ranges_fail_and_name_both() {
        let err = negotiate(range(1, 1), range(2, 3)).unwrap_err();
        assert_eq!(err.to_string(), "no common protocol version: we speak 1..=1, the peer speaks 2..=3");
        assert!(negotiate(range(3, 1), range(1, 3)).is_err(), "an empty range has nothing in common");
    }
}
