//! Errors as one line: an error with its causes, and a gRPC status with its
//! transport cause. Used wherever an error from a client library (tonic,
//! rustls, bollard) becomes a message for the operator.

use std::error::Error as StdError;

/// `err: cause: cause...` on one line, skipping causes already in the text
/// (TLS alerts are usually several levels down; the Docker driver uses it
/// for engine errors too).
pub fn error_chain(err: &(dyn StdError + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// A tonic status as one line: code, message and any transport cause.
pub fn status_text(status: &tonic::Status) -> String {
    let mut text = format!("{:?}: {}", status.code(), status.message());
    if let Some(source) = status.source() {
        text.push_str(": ");
        text.push_str(&error_chain(source));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer: {0}")]
    struct Outer(#[source] Inner);

    #[derive(Debug, thiserror::Error)]
    #[error("inner")]
    struct Inner(#[source] std::io::Error);

    #[test]
    fn causes_are_joined_once() {
        let e = Outer(Inner(std::io::Error::other("disk on fire")));
        // "inner" is already in the outer text; the io error is not.
        assert_eq!(error_chain(&e), "outer: inner: disk on fire");
    }
}
