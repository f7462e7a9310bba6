//! How yr's own types appear inside MessagePack values: as extension types, so that other
//! languages can tell an object reference or an instance handle from plain bytes.

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::ser::{SerializeTuple, Serializer};
use serde::Serialize;

/// Extension type of an object reference (16-byte id).
pub const OBJECT_REF: i8 = 1;
/// Extension type of an instance handle (the instance id as UTF-8).
pub const INSTANCE_HANDLE: i8 = 2;

/// rmp-serde's name for a newtype struct that it writes as a MessagePack extension.
const EXT_STRUCT: &str = "_ExtStruct";

struct Bytes<'a>(&'a [u8]);

impl Serialize for Bytes<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(self.0)
    }
}

struct Ext<'a>(i8, &'a [u8]);

impl Serialize for Ext<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut tuple = serializer.serialize_tuple(2)?;
        tuple.serialize_element(&self.0)?;
        tuple.serialize_element(&Bytes(self.1))?;
        tuple.end()
    }
}

/// Write `data` as extension `kind`.
pub fn serialize<S: Serializer>(kind: i8, data: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_newtype_struct(EXT_STRUCT, &Ext(kind, data))
}

struct ByteVec(Vec<u8>);

impl<'de> de::Deserialize<'de> for ByteVec {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ByteVisitor;
        impl<'de> Visitor<'de> for ByteVisitor {
            type Value = ByteVec;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<ByteVec, E> {
                Ok(ByteVec(v.to_vec()))
            }
            fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<ByteVec, E> {
                Ok(ByteVec(v))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<ByteVec, A::Error> {
                let mut out = Vec::new();
                while let Some(byte) = seq.next_element::<u8>()? {
                    out.push(byte);
                }
                Ok(ByteVec(out))
            }
        }
        deserializer.deserialize_byte_buf(ByteVisitor)
    }
}

struct ExtVisitor(i8);

impl<'de> Visitor<'de> for ExtVisitor {
    type Value = Vec<u8>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "a yr extension value of type {}", self.0)
    }

    fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<Vec<u8>, D::Error> {
        d.deserialize_tuple(2, self)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
        let kind: i8 = seq
            .next_element()?
            .ok_or_else(|| de::Error::invalid_length(0, &self))?;
        if kind != self.0 {
            return Err(de::Error::custom(format!(
                "expected yr extension type {}, found {kind}",
                self.0
            )));
        }
        let data: ByteVec = seq
            .next_element()?
            .ok_or_else(|| de::Error::invalid_length(1, &self))?;
        Ok(data.0)
    }
}

/// Read extension `kind`'s data.
pub fn deserialize<'de, D: Deserializer<'de>>(
    kind: i8,
    deserializer: D,
) -> Result<Vec<u8>, D::Error> {
    deserializer.deserialize_newtype_struct(EXT_STRUCT, ExtVisitor(kind))
}
