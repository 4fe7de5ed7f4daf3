//! Property tests: every message round-trips; no byte string panics the decoder or makes it accept garbage.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use fulcrum_protocol::*;
use proptest::prelude::*;

fn text(max: usize) -> impl Strategy<Value = String> {
    proptest::string::string_regex(&format!("[a-z0-9.-]{{1,{max}}}")).unwrap()
}

fn dns_name() -> impl Strategy<Value = String> {
    proptest::string::string_regex("[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?(\\.[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?){0,3}")
        .unwrap()
}

fn ip() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        any::<[u8; 4]>().prop_map(|b| IpAddr::V4(Ipv4Addr::from(b))),
        any::<[u8; 16]>().prop_map(|b| IpAddr::V6(Ipv6Addr::from(b))),
    ]
}

fn bp() -> impl Strategy<Value = u16> {
    0..=FULL_SCALE_BP
}

fn hello() -> impl Strategy<Value = Hello> {
    (dns_name(), 1u16..=PROTOCOL_VERSION, ip(), proptest::collection::vec(any::<u16>(), 1..=MAX_PORTS), text(40))
        .prop_map(|(agent_name, max, real_server, ports, software)| Hello {
            agent_name,
            versions: VersionRange { min: 1, max },
            real_server,
            ports,
            software,
        })
}

fn probe_outcome() -> impl Strategy<Value = ProbeOutcome> {
    let sample = (any::<u32>(), any::<Option<u32>>(), any::<Option<u16>>())
        .prop_map(|(connect_us, first_byte_us, http_status)| ProbeSample { connect_us, first_byte_us, http_status });
    let failure = prop_oneof![
        Just(ProbeFailure::ConnectRefused),
        Just(ProbeFailure::Timeout),
        Just(ProbeFailure::Network),
        Just(ProbeFailure::BadResponse),
        any::<u16>().prop_map(ProbeFailure::HttpStatus),
    ];
    prop_oneof![Just(ProbeOutcome::Pending), sample.prop_map(ProbeOutcome::Ok), failure.prop_map(ProbeOutcome::Failed)]
}

fn report() -> impl Strategy<Value = LoadReport> {
    let cpu = proptest::option::of((
        prop_oneof![Just(CpuSource::ProcStat), Just(CpuSource::CgroupV1), Just(CpuSource::CgroupV2)],
        bp(),
    ))
    .prop_map(|c| c.map(|(source, busy_bp)| CpuUsage { source, busy_bp }));
    let psi = proptest::option::of((bp(), bp(), any::<u64>())).prop_map(|p| {
        p.map(|(some_avg10_bp, some_avg60_bp, some_total_us)| CpuPressure {
            some_avg10_bp,
            some_avg60_bp,
            some_total_us,
        })
    });
    let memory =
        (any::<u64>(), any::<u64>()).prop_map(|(a, b)| MemoryUsage { used_bytes: a.min(b), total_bytes: a.max(b) });
    let probe = (
        prop_oneof![Just(ProbeKind::Tcp), Just(ProbeKind::Http)],
        probe_outcome(),
        any::<Option<u32>>(),
        any::<u32>(),
        any::<u64>(),
    )
        .prop_map(|(kind, last, smoothed_us, consecutive_failures, total_failures)| ProbeReport {
            kind,
            last,
            smoothed_us,
            consecutive_failures,
            total_failures,
        });
    (any::<u64>(), any::<u32>(), cpu, any::<[u32; 3]>(), memory, psi, any::<u32>(), probe).prop_map(
        |(seq, interval_ms, cpu, load_avg_milli, memory, cpu_pressure, established_connections, probe)| LoadReport {
            seq,
            interval_ms,
            cpu,
            load_avg_milli,
            memory,
            cpu_pressure,
            established_connections,
            probe,
        },
    )
}

fn agent_message() -> impl Strategy<Value = AgentMessage> {
    prop_oneof![
        hello().prop_map(AgentMessage::Hello),
        report().prop_map(AgentMessage::Report),
        Just(AgentMessage::Goodbye(Goodbye { reason: GoodbyeReason::Shutdown })),
    ]
}

fn instructions() -> impl Strategy<Value = Instructions> {
    (any::<u32>(), any::<bool>()).prop_map(|(report_interval_ms, drain)| Instructions { report_interval_ms, drain })
}

fn director_message() -> impl Strategy<Value = DirectorMessage> {
    let reason = prop_oneof![
        Just(RejectReason::UnsupportedVersion),
        Just(RejectReason::UnknownRealServer),
        Just(RejectReason::NameMismatch),
        Just(RejectReason::ExpectedHello),
    ];
    prop_oneof![
        (1u16..=PROTOCOL_VERSION, text(MAX_NAME_LEN), instructions()).prop_map(
            |(version, director_name, instructions)| {
                DirectorMessage::Welcome(Welcome { version, director_name, instructions })
            }
        ),
        (reason, text(MAX_TEXT_LEN)).prop_map(|(reason, detail)| DirectorMessage::Reject(Reject { reason, detail })),
        (any::<u64>(), instructions()).prop_map(|(seq, instructions)| DirectorMessage::Ack(Ack { seq, instructions })),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn agent_messages_round_trip(msg in agent_message()) {
        let mut buf = Vec::new();
        encode_frame(PROTOCOL_VERSION, &msg, &mut buf).unwrap();
        prop_assert!(buf.len() <= MAX_FRAME_LEN);
        let (frame, used) = decode_frame::<AgentMessage>(&buf).unwrap();
        prop_assert_eq!(used, buf.len());
        prop_assert_eq!(frame.version, PROTOCOL_VERSION);
        prop_assert_eq!(frame.message, msg);
    }

    #[test]
    fn director_messages_round_trip(msg in director_message()) {
        let mut buf = Vec::new();
        encode_frame(PROTOCOL_VERSION, &msg, &mut buf).unwrap();
        let (frame, used) = decode_frame::<DirectorMessage>(&buf).unwrap();
        prop_assert_eq!(used, buf.len());
        prop_assert_eq!(frame.message, msg);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = decode_frame::<AgentMessage>(&bytes);
        let _ = decode_frame::<DirectorMessage>(&bytes);
    }

    /// Garbage behind a valid header exercises the body decoder rather than the magic check.
    #[test]
    fn arbitrary_bodies_never_panic(body in proptest::collection::vec(any::<u8>(), 0..600)) {
        let mut bytes = b"FU\x00\x01".to_vec();
        bytes.extend_from_slice(&(body.len() as u32).to_be_bytes());
        bytes.extend_from_slice(&body);
        if let Ok((frame, _)) = decode_frame::<AgentMessage>(&bytes) {
            // Whatever decodes must also be valid and survive a re-encode as the same message. (Not the same
            // bytes: bincode accepts non-minimal varints, as the fuzzer showed.)
            let mut again = Vec::new();
            encode_frame(PROTOCOL_VERSION, &frame.message, &mut again).unwrap();
            let (back, _) = decode_frame::<AgentMessage>(&again).unwrap();
            prop_assert_eq!(back.message, frame.message);
        }
    }

    /// The case the fuzzer found: a non-minimal varint decodes to the same value as the minimal one.
    #[test]
    fn non_minimal_varints_decode_to_the_same_message(_unit in Just(())) {
        let minimal = [b'F', b'U', 0, 1, 0, 0, 0, 4, 2, 50, 0, 0];
        let padded = [b'F', b'U', 0, 1, 0, 0, 0, 6, 2, 251, 0, 50, 0, 0];
        // An Ack of report 50.
        let a = decode_frame::<DirectorMessage>(&minimal).map(|(f, _)| f.message).unwrap();
        let b = decode_frame::<DirectorMessage>(&padded).map(|(f, _)| f.message).unwrap();
        let is_ack_of_50 = matches!(a, DirectorMessage::Ack(Ack { seq: 50, .. }));
        prop_assert!(is_ack_of_50);
        prop_assert_eq!(a, b);
    }

    /// Every strict prefix of a valid frame is reported as truncated, never as some other message.
    #[test]
    fn every_prefix_is_truncated(msg in agent_message()) {
        let mut buf = Vec::new();
        encode_frame(PROTOCOL_VERSION, &msg, &mut buf).unwrap();
        for cut in 0..buf.len() {
            let is_truncated = matches!(decode_frame::<AgentMessage>(&buf[..cut]), Err(FrameError::Truncated { .. }));
            prop_assert!(is_truncated, "prefix of {} bytes", cut);
        }
    }
}
