//! Connection states and the IPVS TCP state machine.
//!
//! The transitions reproduce IPVS's (`net/netfilter/ipvs/ip_vs_proto_tcp.c`, the `tcp_states` and
//! `tcp_states_dos` tables of current kernels, where an ACK in state NONE leads to ESTABLISHED so that
//! sloppy-created entries become active). IPVS tracks TCP from what the director sees, not as an endpoint:
//!
//! * **Input** packets travel client → VIP. The director always sees them.
//! * **Output** packets travel real server → client through the director. Only NAT sees them.
//! * **Input-only**: for DR and TUN the replies bypass the director, so IPVS marks such entries "no output"
//!   and runs input packets through a third set of rows in which a FIN from the client leads to FIN_WAIT
//!   (not CLOSE_WAIT, which would wait for a server FIN the director never sees). The mark is cleared — and
//!   the entry switches to the two-direction rows — if an output packet is ever seen, exactly as IPVS does.
//!
//! The packet's flags pick a row in priority order RST, SYN, FIN, ACK; a packet with none of them moves the
//! entry to CLOSE (IPVS's `tcp_state_idx() < 0` case). Note that RST does not always mean CLOSE: in SYN_RECV
//! an input RST is ignored (a spoofed RST must not kill a handshake), and in LAST_ACK and LISTEN it is too.
//!
//! `secure_tcp` (IPVS's `/proc/sys/net/ipv4/vs/secure_tcp` defense) swaps in the `tcp_states_dos` rows, in
//! which an input-only SYN leads to SYNACK and the entry needs the client's ACK before it is ESTABLISHED.

/// Connection state: the eleven IPVS TCP states (same numbering as IPVS, `IP_VS_TCP_S_*`) and one state for
/// UDP entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ConnState {
    None = 0,
    Established = 1,
    SynSent = 2,
    SynRecv = 3,
    FinWait = 4,
    TimeWait = 5,
    Close = 6,
    CloseWait = 7,
    LastAck = 8,
    Listen = 9,
    SynAck = 10,
    /// Every UDP entry (IPVS's single UDP state); UDP counts as inactive, as in LVS.
    Udp = 11,
}

impl ConnState {
    pub const COUNT: usize = 12;
    pub const ALL: [ConnState; ConnState::COUNT] = [
        ConnState::None,
        ConnState::Established,
        ConnState::SynSent,
        ConnState::SynRecv,
        ConnState::FinWait,
        ConnState::TimeWait,
        ConnState::Close,
        ConnState::CloseWait,
        ConnState::LastAck,
        ConnState::Listen,
        ConnState::SynAck,
        ConnState::Udp,
    ];

    pub fn from_u8(value: u8) -> Option<ConnState> {
        ConnState::ALL.get(value as usize).copied()
    }

    /// The name `ipvsadm -lc` prints.
    pub fn name(self) -> &'static str {
        match self {
            ConnState::None => "NONE",
            ConnState::Established => "ESTABLISHED",
            ConnState::SynSent => "SYN_SENT",
            ConnState::SynRecv => "SYN_RECV",
            ConnState::FinWait => "FIN_WAIT",
            ConnState::TimeWait => "TIME_WAIT",
            ConnState::Close => "CLOSE",
            ConnState::CloseWait => "CLOSE_WAIT",
            ConnState::LastAck => "LAST_ACK",
            ConnState::Listen => "LISTEN",
            ConnState::SynAck => "SYNACK",
            ConnState::Udp => "UDP",
        }
    }

    /// LVS's ActiveConn: an ESTABLISHED TCP connection. Everything else (including UDP) is InActConn.
    pub fn is_active(self) -> bool {
        self == ConnState::Established
    }

    pub fn is_tcp(self) -> bool {
        self != ConnState::Udp
    }
}

impl std::fmt::Display for ConnState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The TCP flags byte: the wire module's type, so the parser's value feeds the state machine as is.
pub use crate::wire::TcpFlags;

/// The state-table row for these flags (RST, SYN, FIN, ACK in that priority), if any.
fn row(flags: TcpFlags) -> Option<usize> {
    if flags.contains(TcpFlags::RST) {
        Some(ROW_RST)
    } else if flags.contains(TcpFlags::SYN) {
        Some(ROW_SYN)
    } else if flags.contains(TcpFlags::FIN) {
        Some(ROW_FIN)
    } else if flags.contains(TcpFlags::ACK) {
        Some(ROW_ACK)
    } else {
        None
    }
}

/// Which way a packet of a tracked connection travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Client → VIP (looked up with [`ConnTable::lookup_forward`](super::ConnTable::lookup_forward)).
    Input,
    /// Real server → client, NAT only (looked up with [`ConnTable::lookup_reply`](super::ConnTable::lookup_reply)).
    Output,
}

/// Whether a TCP packet that matched no entry may create one (be scheduled), or must be dropped and counted.
///
/// Without `sloppy`, only a SYN without ACK or RST starts a connection. (IPVS also schedules on SYN+ACK,
/// for the data connection of active FTP through its FTP helper; Fulcrum has no FTP helper, and a SYN+ACK
/// sent *to* a VIP is never the start of a connection to it.)
///
/// With `sloppy` (IPVS's `sloppy_tcp` sysctl, per service here) any packet without RST creates an entry:
/// this lets a director pick up connections that were established elsewhere — a failover without
/// connection sync, or a director restarted mid-stream. A mid-stream ACK then creates an entry in NONE that
/// the ACK moves to ESTABLISHED. The trade-off is that stray ACKs (scans, stale clients) also get scheduled
/// and occupy entries until they time out, so sloppy is off by default.
/// Whether a packet with `flags` opens a new connection over an entry in `state` of the same 5-tuple: a pure
/// SYN on an entry that is closing or closed. Busy clients reuse their ports within seconds while such
/// entries last minutes (TIME_WAIT 120 s); the client has finished with the old connection, so the new one is
/// scheduled afresh rather than glued to the old one's server (IPVS's `conn_reuse_mode`). A SYN on a
/// half-open or established entry is a retransmission and keeps its entry.
pub fn opens_over(flags: TcpFlags, state: ConnState) -> bool {
    flags.contains(TcpFlags::SYN)
        && !flags.contains(TcpFlags::ACK)
        && !flags.contains(TcpFlags::RST)
        && matches!(
            state,
            ConnState::FinWait | ConnState::TimeWait | ConnState::Close | ConnState::CloseWait | ConnState::LastAck
        )
}

pub fn may_create(flags: TcpFlags, sloppy: bool) -> bool {
    if flags.contains(TcpFlags::RST) {
        return false;
    }
    sloppy || (flags.contains(TcpFlags::SYN) && !flags.contains(TcpFlags::ACK))
}

const ROW_SYN: usize = 0;
const ROW_FIN: usize = 1;
const ROW_ACK: usize = 2;
const ROW_RST: usize = 3;

/// Which set of rows a packet goes through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rows {
    Input = 0,
    Output = 1,
    InputOnly = 2,
}

use ConnState::{
    Close as CL, CloseWait as CW, Established as ES, FinWait as FW, LastAck as LA, Listen as LI, SynAck as SA,
    SynRecv as SR, SynSent as SS, TimeWait as TW,
};

/// `[rows][syn, fin, ack, rst][current state]`, current state in IPVS order
/// NO, ES, SS, SR, FW, TW, CL, CW, LA, LI, SA.
type StateTable = [[[ConnState; 11]; 4]; 3];

#[rustfmt::skip]
const NORMAL: StateTable = [
    // Input          NO  ES  SS  SR  FW  TW  CL  CW  LA  LI  SA
    [/* syn */       [SR, ES, ES, SR, SR, SR, SR, SR, SR, SR, SR],
     /* fin */       [CL, CW, SS, TW, TW, TW, CL, CW, LA, LI, TW],
     /* ack */       [ES, ES, SS, ES, FW, TW, CL, CW, CL, LI, ES],
     /* rst */       [CL, CL, CL, SR, CL, CL, CL, CL, LA, LI, SR]],
    // Output
    [/* syn */       [SS, ES, SS, SR, SS, SS, SS, SS, SS, LI, SR],
     /* fin */       [TW, FW, SS, TW, FW, TW, CL, TW, LA, LI, TW],
     /* ack */       [ES, ES, SS, ES, FW, TW, CL, CW, LA, ES, ES],
     /* rst */       [CL, CL, SS, CL, CL, TW, CL, CL, CL, CL, CL]],
    // Input-only
    [/* syn */       [SR, ES, ES, SR, SR, SR, SR, SR, SR, SR, SR],
     /* fin */       [CL, FW, SS, TW, FW, TW, CL, CW, LA, LI, TW],
     /* ack */       [ES, ES, SS, ES, FW, TW, CL, CW, CL, LI, ES],
     /* rst */       [CL, CL, CL, SR, CL, CL, CL, CL, LA, LI, CL]],
];

#[rustfmt::skip]
const SECURE: StateTable = [
    // Input          NO  ES  SS  SR  FW  TW  CL  CW  LA  LI  SA
    [/* syn */       [SR, ES, ES, SR, SR, SR, SR, SR, SR, SR, SA],
     /* fin */       [CL, CW, SS, TW, TW, TW, CL, CW, LA, LI, SA],
     /* ack */       [ES, ES, SS, SR, FW, TW, CL, CW, CL, LI, SA],
     /* rst */       [CL, CL, CL, SR, CL, CL, CL, CL, LA, LI, CL]],
    // Output
    [/* syn */       [SS, ES, SS, SA, SS, SS, SS, SS, SS, LI, SA],
     /* fin */       [TW, FW, SS, TW, FW, TW, CL, TW, LA, LI, TW],
     /* ack */       [ES, ES, SS, ES, FW, TW, CL, CW, LA, ES, ES],
     /* rst */       [CL, CL, SS, CL, CL, TW, CL, CL, CL, CL, CL]],
    // Input-only
    [/* syn */       [SA, ES, ES, SR, SA, SA, SA, SA, SA, SA, SA],
     /* fin */       [CL, FW, SS, TW, FW, TW, CL, CW, LA, LI, TW],
     /* ack */       [ES, ES, SS, ES, FW, TW, CL, CW, CL, LI, ES],
     /* rst */       [CL, CL, CL, SR, CL, CL, CL, CL, LA, LI, CL]],
];

/// The state after a packet with `flags` went through `rows` in state `current` (a TCP state).
pub(crate) fn next_state(current: ConnState, rows: Rows, flags: TcpFlags, secure: bool) -> ConnState {
    debug_assert!(current.is_tcp());
    let Some(row) = row(flags) else {
        return ConnState::Close;
    };
    let table = if secure { &SECURE } else { &NORMAL };
    table[rows as usize][row][current as usize]
}
