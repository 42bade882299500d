//! RDMA (feature `rdma`): device discovery through ibverbs, and the endpoint record two peers
//! exchange over the tcp control channel to connect reliable-connected queue pairs.
//!
//! Status: what works without hardware is here and tested: discovery that turns "no RDMA
//! here" (no kernel support, no device, no provider library) into [`Error::NoRdmaDevice`],
//! [`connect_with_fallback`] that then uses tcp, and the endpoint record's encoding. Memory
//! registration of a region (`ibv_reg_mr`), queue-pair bring-up and RDMA READ work requests
//! need a device to test against and are not written yet; until they are,
//! [`connect_with_fallback`] uses tcp even where a device exists, and says so in the log.

use std::net::ToSocketAddrs;
use std::time::Duration;

use crate::wire::FrameError;
use crate::{Error, Result, TcpTransport, Transport};

/// The RDMA devices this host has, by name.
///
/// # Errors
///
/// [`Error::NoRdmaDevice`] when the verbs library reports no kernel support, no permission,
/// or an empty list.
pub fn devices() -> Result<Vec<String>> {
    let list = ibverbs::devices().map_err(|e| Error::NoRdmaDevice {
        reason: e.to_string(),
    })?;
    let names: Vec<String> = list
        .iter()
        .map(|d| {
            d.name().map_or_else(
                || "unnamed".to_owned(),
                |n| n.to_string_lossy().into_owned(),
            )
        })
        .collect();
    if names.is_empty() {
        return Err(Error::NoRdmaDevice {
            reason: "the device list is empty".to_owned(),
        });
    }
    Ok(names)
}

/// Connects to an owner with the best transport available: RDMA when a device is present and
/// the RDMA data path is implemented, else tcp (with a log line saying why).
///
/// # Errors
///
/// Those of [`TcpTransport::new`].
pub fn connect_with_fallback(
    tcp_addr: impl ToSocketAddrs,
    connections: usize,
    timeout: Duration,
) -> Result<Box<dyn Transport>> {
    match devices() {
        Err(error) => tracing::info!(%error, "RDMA unavailable; using tcp"),
        Ok(names) => tracing::warn!(
            ?names,
            "RDMA devices found, but the RDMA READ path is not implemented yet; using tcp"
        ),
    }
    Ok(Box::new(TcpTransport::new(tcp_addr, connections, timeout)?))
}

/// What one side of a reliable-connected queue pair tells the other, over the tcp control
/// channel, to connect it: queue pair number, port LID, GID, starting packet sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoint {
    /// Queue pair number.
    pub qp_num: u32,
    /// Local identifier of the port (InfiniBand); 0 on RoCE.
    pub lid: u16,
    /// Global identifier (RoCE, or routed InfiniBand).
    pub gid: [u8; 16],
    /// First packet sequence number, 24 bits.
    pub psn: u32,
}

/// Bytes of an [`Endpoint`] on the wire: magic, version, fields, CRC32.
pub const ENDPOINT_BYTES: usize = 36;
const ENDPOINT_MAGIC: [u8; 4] = *b"MKEP";

impl Endpoint {
    /// The record's bytes.
    pub fn encode(&self) -> [u8; ENDPOINT_BYTES] {
        let mut b = [0u8; ENDPOINT_BYTES];
        b[..4].copy_from_slice(&ENDPOINT_MAGIC);
        b[4..6].copy_from_slice(&crate::wire::WIRE_VERSION.to_le_bytes());
        b[6..8].copy_from_slice(&self.lid.to_le_bytes());
        b[8..12].copy_from_slice(&self.qp_num.to_le_bytes());
        b[12..16].copy_from_slice(&self.psn.to_le_bytes());
        b[16..32].copy_from_slice(&self.gid);
        let crc = crc32fast::hash(&b[..32]);
        b[32..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes a record.
    ///
    /// # Errors
    ///
    /// The first check that failed, including a PSN wider than 24 bits.
    pub fn decode(bytes: &[u8]) -> Result<Self, FrameError> {
        let b: &[u8; ENDPOINT_BYTES] = bytes
            .get(..ENDPOINT_BYTES)
            .and_then(|b| b.try_into().ok())
            .ok_or(FrameError::Short {
                len: bytes.len(),
                needed: ENDPOINT_BYTES,
            })?;
        let magic = [b[0], b[1], b[2], b[3]];
        if magic != ENDPOINT_MAGIC {
            return Err(FrameError::BadMagic { found: magic });
        }
        let version = u16::from_le_bytes([b[4], b[5]]);
        if version != crate::wire::WIRE_VERSION {
            return Err(FrameError::UnsupportedVersion { found: version });
        }
        if u32::from_le_bytes([b[32], b[33], b[34], b[35]]) != crc32fast::hash(&b[..32]) {
            return Err(FrameError::Checksum);
        }
        let psn = u32::from_le_bytes([b[12], b[13], b[14], b[15]]);
        if psn >= 1 << 24 {
            return Err(FrameError::BadField {
                field: "psn",
                value: psn.into(),
            });
        }
        let mut gid = [0u8; 16];
        gid.copy_from_slice(&b[16..32]);
        Ok(Self {
            qp_num: u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
            lid: u16::from_le_bytes([b[6], b[7]]),
            gid,
            psn,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_round_trip_and_reject_damage() {
        let e = Endpoint {
            qp_num: 0x1234,
            lid: 7,
            gid: [0xfe; 16],
            psn: 0xabcdef,
        };
        assert_eq!(Endpoint::decode(&e.encode()), Ok(e));
        let mut bad = e.encode();
        bad[20] ^= 1;
        assert_eq!(Endpoint::decode(&bad), Err(FrameError::Checksum));
        let wide = Endpoint { psn: 1 << 24, ..e };
        assert!(matches!(
            Endpoint::decode(&wide.encode()),
            Err(FrameError::BadField { field: "psn", .. })
        ));
        assert!(matches!(
            Endpoint::decode(&[0; 10]),
            Err(FrameError::Short { .. })
        ));
    }

    #[test]
    fn no_device_is_a_clear_error_and_falls_back_to_tcp() {
        // These machines have no RDMA hardware; where one has, the first assertion is skipped.
        if let Err(error) = devices() {
            assert!(matches!(error, Error::NoRdmaDevice { .. }));
            assert!(error.to_string().starts_with("no RDMA device"));
        }
        let registry = std::sync::Arc::new(crate::Registry::new().unwrap());
        let server =
            crate::TcpServer::bind("127.0.0.1:0", std::sync::Arc::clone(&registry)).unwrap();
        let region = std::sync::Arc::new(crate::MemfdRegion::new(4096).unwrap());
        region.write(0, b"fallback");
        let h = registry.register(region).unwrap();
        let transport =
            connect_with_fallback(server.local_addr(), 1, Duration::from_secs(5)).unwrap();
        let mut buf = [0u8; 8];
        transport
            .read(
                crate::RemoteSlice {
                    region_id: h.region_id,
                    offset: 0,
                    remote_key: h.remote_key,
                },
                &mut buf,
            )
            .unwrap();
        assert_eq!(&buf, b"fallback");
    }
}
