//! bincode 2 encoding with a hard size limit.

use bincode::config::{self, Configuration, Limit, LittleEndian, Varint};
use bincode::{Decode, Encode};
use thiserror::Error;

/// Largest message either side accepts.
pub const MAX_MESSAGE_SIZE: usize = 64 * 1024;

type WireConfig = Configuration<LittleEndian, Varint, Limit<MAX_MESSAGE_SIZE>>;

fn wire_config() -> WireConfig {
    config::standard().with_limit::<MAX_MESSAGE_SIZE>()
}

#[derive(Debug, Error)]
pub enum WireError {
    #[error("encoding message: {0}")]
    Encode(#[from] bincode::error::EncodeError),
    #[error("malformed message: {0}")]
    Decode(#[from] bincode::error::DecodeError),
    #[error("message has {0} trailing bytes")]
    TrailingBytes(usize),
}

pub fn encode<T: Encode>(message: &T) -> Result<Vec<u8>, WireError> {
    Ok(bincode::encode_to_vec(message, wire_config())?)
}

/// Decodes exactly one message filling all of `bytes`.
pub fn decode<T: Decode<()>>(bytes: &[u8]) -> Result<T, WireError> {
    let (message, used) = bincode::decode_from_slice(bytes, wire_config())?;
    match bytes.len() - used {
        0 => Ok(message),
        extra => Err(WireError::TrailingBytes(extra)),
    }
}
