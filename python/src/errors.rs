//! One error type for every backend, its kind, the Python exception each kind raises and the
//! numeric code Mooncake's API returns for it.

use mooncake_kv_client::ClientError;
use mooncake_kv_client::cluster::ClusterError;
use mooncake_kv_client::proto::ErrorCode;
use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;

create_exception!(
    mooncake_kv,
    MooncakeKVError,
    PyException,
    "Every error the store raises (a miss is not one: it is `None`)."
);
create_exception!(
    mooncake_kv,
    InvalidArgumentError,
    MooncakeKVError,
    "A key, value, buffer, pointer or setting the store cannot take."
);
create_exception!(
    mooncake_kv,
    BufferTooSmallError,
    InvalidArgumentError,
    "The buffer is smaller than the value (nothing is truncated)."
);
create_exception!(
    mooncake_kv,
    TooLargeError,
    InvalidArgumentError,
    "A key or value over the store's limits."
);
create_exception!(
    mooncake_kv,
    NoSpaceError,
    MooncakeKVError,
    "No room for the value, even after eviction."
);
create_exception!(
    mooncake_kv,
    UnauthorizedError,
    MooncakeKVError,
    "The node refused the token."
);
create_exception!(
    mooncake_kv,
    UnavailableError,
    MooncakeKVError,
    "The node cannot be reached, is shutting down, or no cluster member is live."
);
create_exception!(
    mooncake_kv,
    CorruptError,
    MooncakeKVError,
    "A block failed verification (or kept changing under every read)."
);
create_exception!(
    mooncake_kv,
    ClosedError,
    MooncakeKVError,
    "The store was closed."
);
create_exception!(
    mooncake_kv,
    InternalError,
    MooncakeKVError,
    "Anything else: the message says what."
);

/// What kind of failure, for the exception and the code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    InvalidArgument,
    BufferTooSmall,
    TooLarge,
    NoSpace,
    Unauthorized,
    Unavailable,
    Corrupt,
    Closed,
    Internal,
}

/// Mooncake's error codes (`mooncake-store/include/types.h`), the ones this store returns.
pub(crate) mod code {
    pub(crate) const OK: i64 = 0;
    pub(crate) const INTERNAL_ERROR: i64 = -1;
    pub(crate) const BUFFER_OVERFLOW: i64 = -10;
    pub(crate) const NO_AVAILABLE_HANDLE: i64 = -200;
    pub(crate) const INVALID_PARAMS: i64 = -600;
    pub(crate) const OBJECT_NOT_FOUND: i64 = -704;
    pub(crate) const CHECKSUM_MISMATCH: i64 = -801;
    pub(crate) const RPC_FAIL: i64 = -900;
    pub(crate) const UNAVAILABLE_IN_CURRENT_STATUS: i64 = -1010;
}

impl Kind {
    /// Mooncake's code for this kind of failure.
    pub(crate) fn code(self) -> i64 {
        match self {
            Self::InvalidArgument | Self::TooLarge => code::INVALID_PARAMS,
            Self::BufferTooSmall => code::BUFFER_OVERFLOW,
            Self::NoSpace => code::NO_AVAILABLE_HANDLE,
            Self::Unauthorized | Self::Unavailable => code::RPC_FAIL,
            Self::Corrupt => code::CHECKSUM_MISMATCH,
            Self::Closed => code::UNAVAILABLE_IN_CURRENT_STATUS,
            Self::Internal => code::INTERNAL_ERROR,
        }
    }
}

/// A failed call: its kind and a message for people.
#[derive(Debug, Clone)]
pub(crate) struct StoreError {
    pub(crate) kind: Kind,
    pub(crate) message: String,
}

pub(crate) type Result<T, E = StoreError> = std::result::Result<T, E>;

impl StoreError {
    pub(crate) fn new(kind: Kind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }

    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        Self::new(Kind::InvalidArgument, message)
    }

    pub(crate) fn closed() -> Self {
        Self::new(Kind::Closed, "the store is closed")
    }

    /// The Python exception.
    pub(crate) fn to_py(&self) -> PyErr {
        let message = self.message.clone();
        match self.kind {
            Kind::InvalidArgument => InvalidArgumentError::new_err(message),
            Kind::BufferTooSmall => BufferTooSmallError::new_err(message),
            Kind::TooLarge => TooLargeError::new_err(message),
            Kind::NoSpace => NoSpaceError::new_err(message),
            Kind::Unauthorized => UnauthorizedError::new_err(message),
            Kind::Unavailable => UnavailableError::new_err(message),
            Kind::Corrupt => CorruptError::new_err(message),
            Kind::Closed => ClosedError::new_err(message),
            Kind::Internal => InternalError::new_err(message),
        }
    }
}

impl From<StoreError> for PyErr {
    fn from(error: StoreError) -> Self {
        error.to_py()
    }
}

fn refusal_kind(code: ErrorCode) -> Kind {
    match code {
        ErrorCode::BadRequest => Kind::InvalidArgument,
        ErrorCode::Unauthorized => Kind::Unauthorized,
        ErrorCode::TooLarge => Kind::TooLarge,
        ErrorCode::NoSpace => Kind::NoSpace,
        ErrorCode::ShuttingDown | ErrorCode::Busy => Kind::Unavailable,
        ErrorCode::Corrupt => Kind::Corrupt,
        ErrorCode::Internal => Kind::Internal,
    }
}

impl From<mooncake_kv_client::proto::ErrorReply> for StoreError {
    fn from(reply: mooncake_kv_client::proto::ErrorReply) -> Self {
        Self::new(refusal_kind(reply.code), reply.message)
    }
}

fn client_kind(error: &ClientError) -> Kind {
    match error {
        ClientError::Refused(reply) => refusal_kind(reply.code),
        ClientError::BufferTooSmall { .. } => Kind::BufferTooSmall,
        ClientError::Stale { .. } | ClientError::Corrupt { .. } => Kind::Corrupt,
        ClientError::Io { .. } | ClientError::Transfer(_) | ClientError::NoSharedMemory(_) => {
            Kind::Unavailable
        }
        _ => Kind::Internal,
    }
}

impl From<ClientError> for StoreError {
    fn from(error: ClientError) -> Self {
        Self::new(client_kind(&error), error.to_string())
    }
}

impl From<ClusterError> for StoreError {
    fn from(error: ClusterError) -> Self {
        let kind = match &error {
            // Every replica failed the same way (too small a buffer, no space, ...): that way.
            ClusterError::AllReplicasFailed(failures) | ClusterError::Quorum { failures, .. } => {
                let kinds: Vec<Kind> = failures.iter().map(|f| client_kind(&f.error)).collect();
                match kinds.first() {
                    Some(&first) if kinds.iter().all(|&k| k == first) => first,
                    _ => Kind::Unavailable,
                }
            }
            ClusterError::BufferTooSmall { .. } => Kind::BufferTooSmall,
            ClusterError::NoLiveMember => Kind::Unavailable,
            ClusterError::Config(_) => Kind::InvalidArgument,
            _ => Kind::Internal,
        };
        Self::new(kind, error.to_string())
    }
}

#[cfg(feature = "embedded")]
impl From<mooncake_kv_engine::Error> for StoreError {
    fn from(error: mooncake_kv_engine::Error) -> Self {
        use mooncake_kv_engine::Error as E;
        use mooncake_kv_format::Error as F;
        let kind = match &error {
            E::Config { .. } | E::NotPersistent => Kind::InvalidArgument,
            E::Format(F::KeyTooLong { .. } | F::ValueTooLarge { .. }) => Kind::TooLarge,
            E::Format(F::EmptyKey) => Kind::InvalidArgument,
            E::Format(F::BufferTooSmall { .. }) | E::BufferTooSmall { .. } => Kind::BufferTooSmall,
            E::Format(_) | E::BlockMismatch { .. } => Kind::Corrupt,
            E::NoSpace { .. } => Kind::NoSpace,
            E::DataDir { .. } | E::DirectoryInUse { .. } | E::IncompatibleDataDir { .. } => {
                Kind::InvalidArgument
            }
            // An HBM tier asked of a machine with no driver or no such GPU: a setting this
            // machine cannot meet, as an HBM tier asked of a build without `cuda` is.
            E::Tier(mooncake_kv_engine::TierError::Device { action: "open", .. }) => {
                Kind::InvalidArgument
            }
            _ => Kind::Internal,
        };
        Self::new(kind, error.to_string())
    }
}

/// Adds the exception classes to the module, each with `mooncake_code`: the code
/// Mooncake's API returns for that failure (what the compatible class answers).
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("MooncakeKVError", py.get_type::<MooncakeKVError>())?;
    py.get_type::<MooncakeKVError>()
        .setattr("mooncake_code", code::INTERNAL_ERROR)?;
    let kinds = [
        (Kind::InvalidArgument, py.get_type::<InvalidArgumentError>()),
        (Kind::BufferTooSmall, py.get_type::<BufferTooSmallError>()),
        (Kind::TooLarge, py.get_type::<TooLargeError>()),
        (Kind::NoSpace, py.get_type::<NoSpaceError>()),
        (Kind::Unauthorized, py.get_type::<UnauthorizedError>()),
        (Kind::Unavailable, py.get_type::<UnavailableError>()),
        (Kind::Corrupt, py.get_type::<CorruptError>()),
        (Kind::Closed, py.get_type::<ClosedError>()),
        (Kind::Internal, py.get_type::<InternalError>()),
    ];
    for (kind, class) in kinds {
        class.setattr("mooncake_code", kind.code())?;
        m.add(class.name()?, class)?;
    }
    Ok(())
}
