//! Why a TLS handshake failed, as the stable reason the sidecar reports in metrics and logs,
//! read from the error's type (rustls' error inside tokio-rustls' `io::Error`), never its text.

use rustls::{AlertDescription, CertificateError, Error};

use crate::verifier::WrongIdentity;

/// A refused or failed handshake, by cause.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandshakeFailure {
    /// The client offered no certificate where one is required.
    NoClientCertificate,
    /// A certificate (ours, as the peer says, or the peer's) is past its NotAfter.
    CertificateExpired,
    /// A certificate does not chain to the mesh's trust bundle.
    UnknownIssuer,
    /// The server proved a SPIFFE ID other than the one dialled.
    WrongIdentity,
    /// The bytes were not TLS (plaintext to a TLS port, or garbage).
    NotTls,
    /// The peer closed the connection before the handshake ended.
    ClosedDuringHandshake,
    /// Anything else.
    Other,
}

impl HandshakeFailure {
    /// Classifies an error from a tokio-rustls accept or connect.
    pub fn of(e: &std::io::Error) -> Self {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            return HandshakeFailure::ClosedDuringHandshake;
        }
        match e.get_ref().and_then(|inner| inner.downcast_ref::<Error>()) {
            Some(tls) => Self::of_rustls(tls),
            None => HandshakeFailure::Other,
        }
    }

    fn of_rustls(e: &Error) -> Self {
        match e {
            Error::NoCertificatesPresented
            | Error::AlertReceived(AlertDescription::CertificateRequired) => {
                HandshakeFailure::NoClientCertificate
            }
            Error::InvalidCertificate(
                CertificateError::Expired | CertificateError::ExpiredContext { .. },
            )
            | Error::AlertReceived(AlertDescription::CertificateExpired) => {
                HandshakeFailure::CertificateExpired
            }
            Error::InvalidCertificate(CertificateError::UnknownIssuer)
            | Error::AlertReceived(AlertDescription::UnknownCA) => HandshakeFailure::UnknownIssuer,
            Error::InvalidCertificate(CertificateError::Other(other))
                if other.0.downcast_ref::<WrongIdentity>().is_some() =>
            {
                HandshakeFailure::WrongIdentity
            }
            Error::InvalidMessage(_) => HandshakeFailure::NotTls,
            _ => HandshakeFailure::Other,
        }
    }

    /// The reason label (`moat_tls_handshake_failures_total{reason}`, the access log).
    pub fn code(self) -> &'static str {
        match self {
            HandshakeFailure::NoClientCertificate => "no-client-certificate",
            HandshakeFailure::CertificateExpired => "certificate-expired",
            HandshakeFailure::UnknownIssuer => "unknown-issuer",
            HandshakeFailure::WrongIdentity => "wrong-identity",
            HandshakeFailure::NotTls => "not-tls",
            HandshakeFailure::ClosedDuringHandshake => "closed-during-handshake",
            HandshakeFailure::Other => "tls-error",
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rustls::InvalidMessage;

    use super::*;

    fn io(e: Error) -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::InvalidData, e)
    }

    #[test]
    fn causes_are_read_from_the_error_types() {
        let wrong = WrongIdentity {
            expected: "spiffe://t/ns/a/sa/b".into(),
            presented: "spiffe://t/ns/a/sa/evil".into(),
        };
        let table = [
            (Error::NoCertificatesPresented, "no-client-certificate"),
            (
                Error::AlertReceived(AlertDescription::CertificateRequired),
                "no-client-certificate",
            ),
            (
                Error::InvalidCertificate(CertificateError::Expired),
                "certificate-expired",
            ),
            (
                Error::AlertReceived(AlertDescription::CertificateExpired),
                "certificate-expired",
            ),
            (
                Error::InvalidCertificate(CertificateError::UnknownIssuer),
                "unknown-issuer",
            ),
            (
                Error::AlertReceived(AlertDescription::UnknownCA),
                "unknown-issuer",
            ),
            (
                Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(
                    wrong,
                )))),
                "wrong-identity",
            ),
            (
                Error::InvalidMessage(InvalidMessage::InvalidContentType),
                "not-tls",
            ),
            (
                Error::InvalidCertificate(CertificateError::BadEncoding),
                "tls-error",
            ),
        ];
        for (e, code) in table {
            let text = format!("{e:?}");
            assert_eq!(HandshakeFailure::of(&io(e)).code(), code, "{text}");
        }
        let eof = std::io::Error::from(std::io::ErrorKind::UnexpectedEof);
        assert_eq!(HandshakeFailure::of(&eof).code(), "closed-during-handshake");
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert_eq!(HandshakeFailure::of(&reset).code(), "tls-error");
    }
}
