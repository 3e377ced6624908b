//! What `basic_publish` accepts as a message body: owned bytes are taken as they are, borrowed
//! bytes are copied once.

use bytes::Bytes;

/// A message body for [`Channel::basic_publish`](crate::Channel::basic_publish): [`Bytes`],
/// `Vec<u8>`, `Box<[u8]>` and `String` are taken without a copy; `&[u8]`, `&[u8; N]`,
/// `&Vec<u8>` and `&str` are copied (the broker keeps the body after the call returns), as
/// lapin's `basic_publish` takes a `&[u8]`.
pub trait IntoBody {
    /// The body as the broker keeps it.
    fn into_body(self) -> Bytes;
}

impl IntoBody for Bytes {
    fn into_body(self) -> Bytes {
        self
    }
}

impl IntoBody for Vec<u8> {
    fn into_body(self) -> Bytes {
        Bytes::from(self)
    }
}

impl IntoBody for Box<[u8]> {
    fn into_body(self) -> Bytes {
        Bytes::from(self)
    }
}

impl IntoBody for String {
    fn into_body(self) -> Bytes {
        Bytes::from(self)
    }
}

impl IntoBody for &[u8] {
    fn into_body(self) -> Bytes {
        Bytes::copy_from_slice(self)
    }
}

impl<const N: usize> IntoBody for &[u8; N] {
    fn into_body(self) -> Bytes {
        Bytes::copy_from_slice(self)
    }
}

impl IntoBody for &Vec<u8> {
    fn into_body(self) -> Bytes {
        Bytes::copy_from_slice(self)
    }
}

impl IntoBody for &str {
    fn into_body(self) -> Bytes {
        Bytes::copy_from_slice(self.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owned_bodies_are_not_copied() {
        let v = vec![1u8, 2, 3];
        let at = v.as_ptr();
        assert_eq!(v.into_body().as_ptr(), at);
        let b = Bytes::from_static(b"abc");
        let at = b.as_ptr();
        assert_eq!(b.into_body().as_ptr(), at);
    }

    #[test]
    fn borrowed_bodies_are_copied() {
        let v = vec![1u8, 2, 3];
        let copy = v.as_slice().into_body();
        assert_eq!(&copy[..], &v[..]);
        assert_ne!(copy.as_ptr(), v.as_ptr());
        assert_eq!(&b"xy".into_body()[..], b"xy");
        assert_eq!(&"xy".into_body()[..], b"xy");
    }
}
