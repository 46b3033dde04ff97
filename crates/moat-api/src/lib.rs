//! The moat wire contract: Rust types and tonic clients/servers generated at build time from
//! `proto/moat/v1`, and the codec they use. Conversion to domain types happens at each gRPC edge.

/// `moat.v1`: Identity, Mesh, Admin.
pub mod v1 {
    #![allow(missing_docs, clippy::all, missing_debug_implementations)]
    tonic::include_proto!("moat.v1");
}

use std::marker::PhantomData;

use tonic::codec::BufferSettings;
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// Where every message buffer of a call starts (tonic's default is 8 KiB per direction). A
/// control plane holds one `Mesh.Stream` per proxy, mostly idle and exchanging messages of a
/// few hundred bytes; at 10,000 proxies the default alone would be 160 MB. Buffers still grow
/// for larger messages.
const BUFFER: usize = 1024;
/// Encoded responses are handed to the transport once this many bytes are pending (tonic's
/// default).
const YIELD_AT: usize = 32 * 1024;

/// The codec of every moat service: protobuf via prost, with small starting buffers.
#[derive(Debug, Clone)]
pub struct Codec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for Codec<T, U> {
    fn default() -> Self {
        Codec(PhantomData)
    }
}

impl<T, U> tonic::codec::Codec for Codec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(BufferSettings::new(BUFFER, YIELD_AT))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(BufferSettings::new(BUFFER, YIELD_AT))
    }
}
