//! The write half of a stream wrapper that only looks at reads (`detect::Prefixed`,
//! `conn_guard::HeadClock`): every write call goes straight to the wrapped stream.

/// Implements `tokio::io::AsyncWrite` for `$wrapper<IO>` by handing every call to its `$field`.
/// Vectored writes are forwarded too, not left to the trait's default (which writes the first
/// slice alone): h2 hands a DATA frame's header and payload over as two slices, so without it
/// every HTTP/2 answer took two system calls. (HTTP/1.1 answers are flattened by hyper instead:
/// `writev(false)` in `conn_guard::serve_http`.)
macro_rules! forward_writes {
    ($wrapper:ident, $field:ident) => {
        impl<IO: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for $wrapper<IO> {
            fn poll_write(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                buf: &[u8],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.$field).poll_write(cx, buf)
            }
            fn poll_write_vectored(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                bufs: &[std::io::IoSlice<'_>],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.$field).poll_write_vectored(cx, bufs)
            }
            fn is_write_vectored(&self) -> bool {
                self.$field.is_write_vectored()
            }
            fn poll_flush(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.$field).poll_flush(cx)
            }
            fn poll_shutdown(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.$field).poll_shutdown(cx)
            }
        }
    };
}

pub(crate) use forward_writes;
