//! What of the RDMA transport can be tested without a device.

use super::*;
use proptest::prelude::*;

fn port(gid: [u8; 16]) -> PortInfo {
    PortInfo {
        port: 1,
        lid: 3,
        mtu: 5,
        gid_index: 2,
        gid,
        max_rd_atomic: 16,
        max_dest_rd_atomic: 8,
        max_qp_wr: 1024,
    }
}

fn peer(gid: [u8; 16], mtu: u8) -> QpEndpoint {
    QpEndpoint {
        qp_num: 0x42,
        lid: 9,
        gid,
        psn: 0x1234,
        mtu,
    }
}

#[test]
fn no_device_is_a_clear_error_and_falls_back_to_tcp() {
    // These machines have no RDMA hardware; where one has, the device assertions are skipped.
    if let Err(error) = devices() {
        assert!(matches!(error, Error::NoRdmaDevice { .. }), "{error}");
        assert!(error.to_string().starts_with("no RDMA device"));
        let registry = Arc::new(Registry::new().unwrap());
        let server = RdmaServer::bind("127.0.0.1:0", registry, &RdmaConfig::default());
        assert!(matches!(server, Err(Error::NoRdmaDevice { .. })));
        // The device is looked for before the network: nothing listens on this port, and the
        // error is still the missing device.
        let unused: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let transport =
            RdmaTransport::connect(unused, 1, Duration::from_secs(1), RdmaConfig::default());
        assert!(matches!(transport, Err(Error::NoRdmaDevice { .. })));
    }
    let registry = Arc::new(Registry::new().unwrap());
    let server = crate::TcpServer::bind("127.0.0.1:0", Arc::clone(&registry)).unwrap();
    let region = Arc::new(crate::MemfdRegion::new(4096).unwrap());
    region.write(0, b"fallback");
    let h = registry.register(region).unwrap();
    let rdma_addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let transport = connect_with_fallback(
        server.local_addr(),
        Some(rdma_addr),
        1,
        Duration::from_secs(5),
    )
    .unwrap();
    let mut buf = [0u8; 8];
    transport
        .read(
            RemoteSlice {
                region_id: h.region_id,
                offset: 0,
                remote_key: h.remote_key,
            },
            &mut buf,
        )
        .unwrap();
    assert_eq!(&buf, b"fallback");
}

#[test]
fn settings_out_of_range_are_refused_before_any_device_is_opened() {
    for bad in [
        RdmaConfig {
            port: 0,
            ..RdmaConfig::default()
        },
        RdmaConfig {
            staging_bytes: 100,
            ..RdmaConfig::default()
        },
        RdmaConfig {
            reads_in_flight: 0,
            ..RdmaConfig::default()
        },
    ] {
        let registry = Arc::new(Registry::new().unwrap());
        assert!(matches!(
            RdmaServer::bind("127.0.0.1:0", registry, &bad),
            Err(Error::Rdma { .. })
        ));
    }
    assert!(RdmaConfig::default().validate().is_ok());
}

#[test]
#[expect(unsafe_code, reason = "reads a union field of the verbs attributes")]
fn roce_peers_are_reached_through_their_gid() {
    let gid = [0xfe; 16];
    let [init, rtr, rts] = transitions(&port(gid), 0x777, &peer(gid, 3), true);
    use ffi::ibv_qp_attr_mask as m;
    assert_eq!(init.attr.qp_state, ffi::ibv_qp_state::IBV_QPS_INIT);
    assert_eq!(
        init.attr.qp_access_flags,
        ffi::ibv_access_flags::IBV_ACCESS_REMOTE_READ.0
    );
    assert_eq!(init.attr.port_num, 1);
    assert_ne!(init.mask & m::IBV_QP_ACCESS_FLAGS.0, 0);

    assert_eq!(rtr.attr.qp_state, ffi::ibv_qp_state::IBV_QPS_RTR);
    assert_eq!(rtr.attr.dest_qp_num, 0x42);
    assert_eq!(rtr.attr.rq_psn, 0x1234);
    assert_eq!(rtr.attr.path_mtu, 3, "the smaller MTU of the two ports");
    assert_eq!(rtr.attr.max_dest_rd_atomic, 8);
    assert_eq!(rtr.attr.ah_attr.is_global, 1);
    // SAFETY: reading the raw bytes of a GID union is valid for any contents.
    assert_eq!(unsafe { rtr.attr.ah_attr.grh.dgid.raw }, gid);
    assert_eq!(rtr.attr.ah_attr.grh.sgid_index, 2);
    for bit in [
        m::IBV_QP_AV,
        m::IBV_QP_DEST_QPN,
        m::IBV_QP_RQ_PSN,
        m::IBV_QP_PATH_MTU,
    ] {
        assert_ne!(rtr.mask & bit.0, 0);
    }

    assert_eq!(rts.attr.qp_state, ffi::ibv_qp_state::IBV_QPS_RTS);
    assert_eq!(rts.attr.sq_psn, 0x777);
    assert_eq!(rts.attr.max_rd_atomic, 16);
    assert_ne!(rts.mask & m::IBV_QP_MAX_QP_RD_ATOMIC.0, 0);
}

#[test]
fn infiniband_peers_are_reached_by_lid_and_readers_allow_no_remote_access() {
    let [init, rtr, _] = transitions(&port([0; 16]), 1, &peer([0; 16], 5), false);
    assert_eq!(init.attr.qp_access_flags, 0);
    assert_eq!(rtr.attr.ah_attr.is_global, 0);
    assert_eq!(rtr.attr.ah_attr.dlid, 9);
    assert_eq!(rtr.attr.path_mtu, 5);
}

#[test]
fn completions_map_to_errors_with_the_verbs_wording() {
    assert!(completion_error(ffi::ibv_wc_status::IBV_WC_SUCCESS, 0).is_none());
    let error = completion_error(ffi::ibv_wc_status::IBV_WC_REM_ACCESS_ERR, 0x88).unwrap();
    assert!(matches!(
        error,
        Error::RdmaCompletion {
            vendor_err: 0x88,
            ..
        }
    ));
    assert!(error.to_string().contains("remote access error"), "{error}");
}

#[test]
fn refusals_map_to_the_typed_errors_of_every_transport() {
    assert!(matches!(
        refusal_error(5, Status::BadRemoteKey),
        Error::BadRemoteKey { region_id: 5 }
    ));
    assert!(matches!(
        refusal_error(5, Status::UnknownRegion),
        Error::UnknownRegion { region_id: 5 }
    ));
    assert!(matches!(
        refusal_error(5, Status::Other(77)),
        Error::UnexpectedStatus(Status::Other(77))
    ));
}

proptest! {
    #[test]
    fn reads_outside_a_grant_are_refused_before_the_wire(
        addr in 0u64..1 << 47, len in 0u64..1 << 32, offset in any::<u64>(), n in 0usize..1 << 28
    ) {
        let grant = RdmaGrant { status: Status::Ok, region_id: 7, addr, len, rkey: 1 };
        let fits = u128::from(offset) + n as u128 <= u128::from(len);
        match remote_addr(&grant, offset, n) {
            Ok(at) => {
                prop_assert!(fits && n as u64 <= MAX_READ_BYTES);
                prop_assert_eq!(at, addr + offset);
            }
            Err(Error::TooLarge { .. }) => prop_assert!(n as u64 > MAX_READ_BYTES),
            Err(Error::OutOfBounds { region_id, .. }) => {
                prop_assert!(!fits);
                prop_assert_eq!(region_id, 7);
            }
            Err(other) => prop_assert!(false, "unexpected {other}"),
        }
    }

    #[test]
    fn the_plan_covers_every_byte_once_within_the_staging_buffer(
        lens in proptest::collection::vec(prop_oneof![Just(0usize), 1usize..5000, 60_000usize..70_000], 0..40),
        staging in 4096usize..100_000,
        max_pieces in 1usize..20,
    ) {
        let rounds = plan(&lens, staging, max_pieces);
        let mut next = vec![0usize; lens.len()];
        for round in &rounds {
            prop_assert!(!round.is_empty());
            prop_assert!(round.len() <= max_pieces);
            let mut end = 0;
            for p in round {
                prop_assert!(p.len > 0);
                prop_assert_eq!(p.staging_offset % 64, 0);
                prop_assert!(p.staging_offset >= end, "pieces of a round overlap");
                end = p.staging_offset + p.len;
                prop_assert!(end <= staging);
                prop_assert_eq!(p.op_offset, next[p.op], "pieces of a read in order, no gap");
                next[p.op] += p.len;
            }
        }
        prop_assert_eq!(next, lens);
    }
}
