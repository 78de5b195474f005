//! A go-cty msgpack decoder: turns the bytes Nomad sends (`SetConfigRequest.msgpack_config`,
//! `TaskConfig.msgpack_driver_config`) into a typed [`CtyValue`], guided by the [`CtyType`]
//! implied by our own hclspec.
//!
//! Defensive on purpose (fact sheet §3.5): numbers arrive as any integer marker, f32/f64, or a
//! decimal string (`"0.1"`); absent attributes are `nil`; a dynamically typed position is the
//! pair `[bin(type JSON), value]`; unknown values (ext 0 / 12) are rejected.

use std::collections::BTreeMap;
use std::fmt;

use rmpv::Value;

/// Nesting deeper than this is refused (configs are a few levels deep).
pub const MAX_DEPTH: usize = 64;

/// A cty type, as far as our specs use them.
#[derive(Debug, Clone, PartialEq)]
pub enum CtyType {
    /// `string`
    String,
    /// `number`
    Number,
    /// `bool`
    Bool,
    /// `list(T)`
    List(Box<CtyType>),
    /// `set(T)`
    Set(Box<CtyType>),
    /// `map(T)`
    Map(Box<CtyType>),
    /// `object({...})` or a spec `Object`/`Block`.
    Object(BTreeMap<String, CtyType>),
    /// `tuple([...])`
    Tuple(Vec<CtyType>),
    /// `any`: the value carries its own type.
    Dynamic,
}

/// A cty number: exact integers stay exact.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum CtyNumber {
    /// An integer (any msgpack integer marker or an integral decimal string).
    Int(i128),
    /// Anything else.
    Float(f64),
}

impl fmt::Display for CtyNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CtyNumber::Int(i) => write!(f, "{i}"),
            CtyNumber::Float(x) => write!(f, "{x}"),
        }
    }
}

/// A decoded cty value.
#[derive(Debug, Clone, PartialEq)]
pub enum CtyValue {
    /// null of any type.
    Null,
    /// A string.
    String(String),
    /// A number.
    Number(CtyNumber),
    /// A bool.
    Bool(bool),
    /// list, set or tuple elements in order.
    List(Vec<CtyValue>),
    /// A map or object.
    Map(BTreeMap<String, CtyValue>),
}

impl CtyValue {
    /// A short description of the value's kind for error messages.
    pub fn kind(&self) -> &'static str {
        match self {
            CtyValue::Null => "null",
            CtyValue::String(_) => "string",
            CtyValue::Number(_) => "number",
            CtyValue::Bool(_) => "bool",
            CtyValue::List(_) => "list",
            CtyValue::Map(_) => "map",
        }
    }
}

/// Decoding failures; `path` is dotted (`session_config.context_pool_size`, `args[1]`), empty
/// for the top level.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum CtyError {
    /// The bytes are not one complete msgpack value.
    #[error("config is not valid msgpack: {0}")]
    Malformed(String),
    /// Bytes follow the value.
    #[error("config has {0} unexpected trailing bytes after the msgpack value")]
    TrailingBytes(usize),
    /// Empty input where a value was required.
    #[error("config is empty")]
    Empty,
    /// Wrong msgpack kind for the expected type.
    #[error("{}: expected {expected}, got {got}", display_path(path))]
    Type {
        /// Where.
        path: String,
        /// Expected cty type.
        expected: String,
        /// What arrived.
        got: String,
    },
    /// A number string that is not a decimal number.
    #[error("{}: expected a number, got string {value:?}", display_path(path))]
    BadNumber {
        /// Where.
        path: String,
        /// The text.
        value: String,
    },
    /// An object key the schema does not know.
    #[error("{}: unknown attribute {key:?}", display_path(path))]
    UnknownKey {
        /// Object path.
        path: String,
        /// The key.
        key: String,
    },
    /// Ext type 0 or 12: an unknown value.
    #[error(
        "{}: value is unknown (not yet computed); only known values are accepted",
        display_path(path)
    )]
    Unknown {
        /// Where.
        path: String,
    },
    /// Another ext type.
    #[error("{}: unsupported msgpack extension type {ext}", display_path(path))]
    UnsupportedExt {
        /// Where.
        path: String,
        /// Ext type code.
        ext: i8,
    },
    /// A dynamic wrapper whose type JSON cannot be read.
    #[error("{}: invalid dynamic type description: {detail}", display_path(path))]
    BadDynamicType {
        /// Where.
        path: String,
        /// Why.
        detail: String,
    },
    /// Nested too deeply.
    #[error("{}: nested deeper than {MAX_DEPTH} levels", display_path(path))]
    TooDeep {
        /// Where.
        path: String,
    },
}

fn display_path(path: &str) -> &str {
    if path.is_empty() { "config" } else { path }
}

fn child(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// Decodes one cty msgpack value of type `ty` from `bytes`.
pub fn decode(bytes: &[u8], ty: &CtyType) -> Result<CtyValue, CtyError> {
    if bytes.is_empty() {
        return Err(CtyError::Empty);
    }
    let mut cursor = bytes;
    let raw = rmpv::decode::read_value_with_max_depth(&mut cursor, MAX_DEPTH + 2)
        .map_err(|e| CtyError::Malformed(describe_rmpv(&e, bytes.len() - cursor.len())))?;
    if !cursor.is_empty() {
        return Err(CtyError::TrailingBytes(cursor.len()));
    }
    convert(&raw, ty, "", 0)
}

fn describe_rmpv(e: &rmpv::decode::Error, offset: usize) -> String {
    use rmpv::decode::Error as E;
    match e {
        E::InvalidMarkerRead(io) | E::InvalidDataRead(io)
            if io.kind() == std::io::ErrorKind::UnexpectedEof =>
        {
            format!("truncated at byte {offset}")
        }
        E::DepthLimitExceeded => format!("nested deeper than {MAX_DEPTH} levels"),
        other => format!("{other} (near byte {offset})"),
    }
}

fn got(v: &Value) -> String {
    match v {
        Value::Nil => "null".into(),
        Value::Boolean(_) => "bool".into(),
        Value::Integer(_) | Value::F32(_) | Value::F64(_) => "number".into(),
        Value::String(s) => match s.as_str() {
            Some(t) if t.len() <= 40 => format!("string {t:?}"),
            _ => "string".into(),
        },
        Value::Binary(_) => "binary".into(),
        Value::Array(_) => "list".into(),
        Value::Map(_) => "map".into(),
        Value::Ext(t, _) => format!("extension {t}"),
    }
}

fn type_error(path: &str, ty: &CtyType, v: &Value) -> CtyError {
    CtyError::Type {
        path: path.to_string(),
        expected: type_name(ty),
        got: got(v),
    }
}

/// The HCL spelling of a type, for messages.
pub fn type_name(ty: &CtyType) -> String {
    match ty {
        CtyType::String => "string".into(),
        CtyType::Number => "number".into(),
        CtyType::Bool => "bool".into(),
        CtyType::List(t) => format!("list({})", type_name(t)),
        CtyType::Set(t) => format!("set({})", type_name(t)),
        CtyType::Map(t) => format!("map({})", type_name(t)),
        CtyType::Object(_) => "object".into(),
        CtyType::Tuple(_) => "tuple".into(),
        CtyType::Dynamic => "any".into(),
    }
}

fn convert(v: &Value, ty: &CtyType, path: &str, depth: usize) -> Result<CtyValue, CtyError> {
    if depth > MAX_DEPTH {
        return Err(CtyError::TooDeep {
            path: path.to_string(),
        });
    }
    match v {
        Value::Nil => return Ok(CtyValue::Null),
        Value::Ext(0 | 12, _) => {
            return Err(CtyError::Unknown {
                path: path.to_string(),
            });
        }
        Value::Ext(t, _) => {
            return Err(CtyError::UnsupportedExt {
                path: path.to_string(),
                ext: *t,
            });
        }
        _ => {}
    }
    // A dynamic wrapper `[bin(type), value]`, wherever it appears: cty never encodes a string
    // as bin, so a two-element array starting with bin cannot be a list value.
    if let Value::Array(items) = v
        && let [Value::Binary(type_json), inner] = items.as_slice()
    {
        let inner_ty = parse_type_json(type_json).map_err(|detail| CtyError::BadDynamicType {
            path: path.to_string(),
            detail,
        })?;
        return convert(inner, &inner_ty, path, depth + 1);
    }
    match ty {
        CtyType::Dynamic => convert_untyped(v, path, depth),
        CtyType::String => match v {
            Value::String(s) => s
                .as_str()
                .map(|s| CtyValue::String(s.to_string()))
                .ok_or_else(|| CtyError::Type {
                    path: path.to_string(),
                    expected: "string".into(),
                    got: "invalid UTF-8".into(),
                }),
            _ => Err(type_error(path, ty, v)),
        },
        CtyType::Bool => match v {
            Value::Boolean(b) => Ok(CtyValue::Bool(*b)),
            _ => Err(type_error(path, ty, v)),
        },
        CtyType::Number => number(v, path).map(CtyValue::Number),
        CtyType::List(elem) | CtyType::Set(elem) => match v {
            Value::Array(items) => items
                .iter()
                .enumerate()
                .map(|(i, item)| convert(item, elem, &format!("{path}[{i}]"), depth + 1))
                .collect::<Result<_, _>>()
                .map(CtyValue::List),
            _ => Err(type_error(path, ty, v)),
        },
        CtyType::Tuple(elems) => match v {
            Value::Array(items) if items.len() == elems.len() => items
                .iter()
                .zip(elems)
                .enumerate()
                .map(|(i, (item, t))| convert(item, t, &format!("{path}[{i}]"), depth + 1))
                .collect::<Result<_, _>>()
                .map(CtyValue::List),
            _ => Err(type_error(path, ty, v)),
        },
        CtyType::Map(elem) => match v {
            Value::Map(entries) => {
                let mut out = BTreeMap::new();
                for (k, val) in entries {
                    let key = map_key(k, path)?;
                    let converted = convert(val, elem, &child(path, &key), depth + 1)?;
                    out.insert(key, converted);
                }
                Ok(CtyValue::Map(out))
            }
            _ => Err(type_error(path, ty, v)),
        },
        CtyType::Object(attrs) => match v {
            Value::Map(entries) => {
                let mut out = BTreeMap::new();
                for (k, val) in entries {
                    let key = map_key(k, path)?;
                    let Some(attr_ty) = attrs.get(&key) else {
                        return Err(CtyError::UnknownKey {
                            path: path.to_string(),
                            key,
                        });
                    };
                    let converted = convert(val, attr_ty, &child(path, &key), depth + 1)?;
                    out.insert(key, converted);
                }
                // Absent attributes read as null, exactly like cty's encoder writes them.
                for name in attrs.keys() {
                    out.entry(name.clone()).or_insert(CtyValue::Null);
                }
                Ok(CtyValue::Map(out))
            }
            _ => Err(type_error(path, ty, v)),
        },
    }
}

fn map_key(k: &Value, path: &str) -> Result<String, CtyError> {
    match k {
        Value::String(s) => s
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| CtyError::Type {
                path: path.to_string(),
                expected: "UTF-8 string keys".into(),
                got: "invalid UTF-8 key".into(),
            }),
        other => Err(CtyError::Type {
            path: path.to_string(),
            expected: "string keys".into(),
            got: format!("{} key", got(other)),
        }),
    }
}

/// A value without a known type (an `any` position without a wrapper): take it as it comes.
fn convert_untyped(v: &Value, path: &str, depth: usize) -> Result<CtyValue, CtyError> {
    match v {
        Value::Boolean(b) => Ok(CtyValue::Bool(*b)),
        Value::Integer(_) | Value::F32(_) | Value::F64(_) => number(v, path).map(CtyValue::Number),
        Value::String(_) => convert(v, &CtyType::String, path, depth),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, item)| convert(item, &CtyType::Dynamic, &format!("{path}[{i}]"), depth + 1))
            .collect::<Result<_, _>>()
            .map(CtyValue::List),
        Value::Map(_) => convert(v, &CtyType::Map(Box::new(CtyType::Dynamic)), path, depth),
        Value::Binary(_) => Err(CtyError::Type {
            path: path.to_string(),
            expected: "a value".into(),
            got: "binary".into(),
        }),
        Value::Nil | Value::Ext(..) => convert(v, &CtyType::String, path, depth),
    }
}

fn number(v: &Value, path: &str) -> Result<CtyNumber, CtyError> {
    match v {
        Value::Integer(i) => i
            .as_i64()
            .map(|n| CtyNumber::Int(n.into()))
            .or_else(|| i.as_u64().map(|n| CtyNumber::Int(n.into())))
            .ok_or_else(|| type_error(path, &CtyType::Number, v)),
        Value::F32(x) => Ok(float_or_int(f64::from(*x))),
        Value::F64(x) => Ok(float_or_int(*x)),
        Value::String(s) => {
            let text = s.as_str().unwrap_or_default().trim();
            parse_decimal(text).ok_or_else(|| CtyError::BadNumber {
                path: path.to_string(),
                value: s.as_str().unwrap_or("<invalid UTF-8>").to_string(),
            })
        }
        _ => Err(type_error(path, &CtyType::Number, v)),
    }
}

/// An integral float is an integer for our purposes (cty numbers are arbitrary precision).
fn float_or_int(x: f64) -> CtyNumber {
    if x.is_finite() && x.fract() == 0.0 && x.abs() < 1e18 {
        // Exact: |x| < 1e18 fits in i64 and x has no fraction.
        #[allow(clippy::cast_possible_truncation)]
        CtyNumber::Int(x as i128)
    } else {
        CtyNumber::Float(x)
    }
}

/// Parses cty's decimal text (`bf.Text('f', -1)`): an optional sign, digits, an optional
/// fraction; also accepts an exponent for robustness.
pub fn parse_decimal(text: &str) -> Option<CtyNumber> {
    if text.is_empty() || !text.bytes().any(|b| b.is_ascii_digit()) {
        return None;
    }
    let valid = text.bytes().enumerate().all(|(i, b)| {
        b.is_ascii_digit()
            || matches!(b, b'.' | b'e' | b'E')
            || (matches!(b, b'-' | b'+')
                && (i == 0 || matches!(text.as_bytes()[i - 1], b'e' | b'E')))
    });
    if !valid {
        return None;
    }
    if let Ok(i) = text.parse::<i128>() {
        return Some(CtyNumber::Int(i));
    }
    let x = text.parse::<f64>().ok()?;
    Some(float_or_int(x))
}

/// Parses cty's JSON type description (`"string"`, `["list","number"]`,
/// `["object",{"a":"bool"}]`, ...) from the bytes of a dynamic wrapper.
pub fn parse_type_json(bytes: &[u8]) -> Result<CtyType, String> {
    let json: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
    type_from_json(&json, 0)
}

fn type_from_json(j: &serde_json::Value, depth: usize) -> Result<CtyType, String> {
    use serde_json::Value as J;
    if depth > MAX_DEPTH {
        return Err("type nested too deeply".into());
    }
    match j {
        J::String(s) => match s.as_str() {
            "string" => Ok(CtyType::String),
            "number" => Ok(CtyType::Number),
            "bool" => Ok(CtyType::Bool),
            "dynamic" => Ok(CtyType::Dynamic),
            other => Err(format!("unknown primitive type {other:?}")),
        },
        J::Array(parts) => match parts.as_slice() {
            [J::String(kind), inner] => match (kind.as_str(), inner) {
                ("list", t) => Ok(CtyType::List(Box::new(type_from_json(t, depth + 1)?))),
                ("set", t) => Ok(CtyType::Set(Box::new(type_from_json(t, depth + 1)?))),
                ("map", t) => Ok(CtyType::Map(Box::new(type_from_json(t, depth + 1)?))),
                ("tuple", J::Array(ts)) => ts
                    .iter()
                    .map(|t| type_from_json(t, depth + 1))
                    .collect::<Result<_, _>>()
                    .map(CtyType::Tuple),
                ("object", J::Object(attrs)) => attrs
                    .iter()
                    .map(|(k, t)| Ok((k.clone(), type_from_json(t, depth + 1)?)))
                    .collect::<Result<_, String>>()
                    .map(CtyType::Object),
                (other, _) => Err(format!("unknown type constructor {other:?}")),
            },
            // ["object", {...}, [optional attrs]] in newer cty: ignore the optional list.
            [J::String(kind), J::Object(attrs), _] if kind == "object" => attrs
                .iter()
                .map(|(k, t)| Ok((k.clone(), type_from_json(t, depth + 1)?)))
                .collect::<Result<_, String>>()
                .map(CtyType::Object),
            _ => Err("malformed type array".into()),
        },
        _ => Err("type must be a string or an array".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rmpv::Value as V;

    fn enc(v: &V) -> Vec<u8> {
        let mut out = Vec::new();
        rmpv::encode::write_value(&mut out, v).unwrap();
        out
    }

    fn num(bytes: &[u8]) -> Result<CtyValue, CtyError> {
        decode(bytes, &CtyType::Number)
    }

    #[test]
    fn every_integer_marker_decodes() {
        let cases: &[(&[u8], i128)] = &[
            (&[0x05], 5),                 // positive fixint
            (&[0xff], -1),                // negative fixint
            (&[0xcc, 200], 200),          // uint8
            (&[0xcd, 0x1f, 0x90], 8080),  // uint16
            (&[0xce, 0, 1, 0, 0], 65536), // uint32
            (
                &[0xcf, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
                u64::MAX as i128,
            ), // uint64
            (&[0xd0, 0x80], -128),        // int8
            (&[0xd1, 0xff, 0x00], -256),  // int16
            (&[0xd2, 0xff, 0xff, 0xff, 0x00], -256), // int32
            (&[0xd3, 0x80, 0, 0, 0, 0, 0, 0, 0], i64::MIN as i128), // int64
        ];
        for (bytes, want) in cases {
            assert_eq!(
                num(bytes),
                Ok(CtyValue::Number(CtyNumber::Int(*want))),
                "{bytes:x?}"
            );
        }
    }

    #[test]
    fn floats_and_decimal_strings_decode() {
        assert_eq!(
            num(&enc(&V::F32(1.5))),
            Ok(CtyValue::Number(CtyNumber::Float(1.5)))
        );
        assert_eq!(
            num(&enc(&V::F64(2.25))),
            Ok(CtyValue::Number(CtyNumber::Float(2.25)))
        );
        assert_eq!(
            num(&enc(&V::F64(3.0))),
            Ok(CtyValue::Number(CtyNumber::Int(3)))
        );
        assert_eq!(
            num(&enc(&V::from("0.1"))),
            Ok(CtyValue::Number(CtyNumber::Float(0.1)))
        );
        assert_eq!(
            num(&enc(&V::from("123456789012345678901234567890"))),
            Ok(CtyValue::Number(CtyNumber::Int(
                123_456_789_012_345_678_901_234_567_890
            )))
        );
        assert_eq!(
            num(&enc(&V::from("-7"))),
            Ok(CtyValue::Number(CtyNumber::Int(-7)))
        );
        let err = num(&enc(&V::from("abc"))).unwrap_err();
        assert!(err.to_string().contains("\"abc\""), "{err}");
        assert_eq!(
            num(&enc(&V::F64(f64::INFINITY))),
            Ok(CtyValue::Number(CtyNumber::Float(f64::INFINITY)))
        );
    }

    #[test]
    fn nil_is_null_for_every_type() {
        for ty in [
            CtyType::String,
            CtyType::Number,
            CtyType::Bool,
            CtyType::Dynamic,
        ] {
            assert_eq!(decode(&[0xc0], &ty), Ok(CtyValue::Null));
        }
    }

    #[test]
    fn dynamic_wrapper_is_unwrapped() {
        let wrapped = V::Array(vec![V::Binary(b"\"string\"".to_vec()), V::from("x")]);
        assert_eq!(
            decode(&enc(&wrapped), &CtyType::Dynamic),
            Ok(CtyValue::String("x".into()))
        );
        let list = V::Array(vec![
            V::Binary(br#"["list","number"]"#.to_vec()),
            V::Array(vec![V::from(1), V::from("0.5")]),
        ]);
        assert_eq!(
            decode(&enc(&list), &CtyType::Dynamic),
            Ok(CtyValue::List(vec![
                CtyValue::Number(CtyNumber::Int(1)),
                CtyValue::Number(CtyNumber::Float(0.5))
            ]))
        );
        let bad = V::Array(vec![V::Binary(b"[\"frob\",1]".to_vec()), V::Nil]);
        assert!(matches!(
            decode(&enc(&bad), &CtyType::Dynamic),
            Err(CtyError::BadDynamicType { .. })
        ));
    }

    #[test]
    fn unknown_and_foreign_ext_are_rejected() {
        assert!(matches!(
            decode(&[0xd4, 0x00, 0x00], &CtyType::String),
            Err(CtyError::Unknown { .. })
        ));
        assert!(matches!(
            decode(&enc(&V::Ext(12, vec![0x80])), &CtyType::Number),
            Err(CtyError::Unknown { .. })
        ));
        assert!(matches!(
            decode(&enc(&V::Ext(5, vec![1])), &CtyType::Number),
            Err(CtyError::UnsupportedExt { ext: 5, .. })
        ));
    }

    #[test]
    fn object_fills_absent_attributes_and_rejects_unknown_ones() {
        let ty = CtyType::Object(BTreeMap::from([
            ("a".to_string(), CtyType::Number),
            ("b".to_string(), CtyType::String),
        ]));
        let v = V::Map(vec![(V::from("a"), V::from(1))]);
        let out = decode(&enc(&v), &ty).unwrap();
        assert_eq!(
            out,
            CtyValue::Map(BTreeMap::from([
                ("a".into(), CtyValue::Number(CtyNumber::Int(1))),
                ("b".into(), CtyValue::Null)
            ]))
        );
        let v = V::Map(vec![(V::from("zzz"), V::from(1))]);
        let err = decode(&enc(&v), &ty).unwrap_err();
        assert_eq!(err.to_string(), "config: unknown attribute \"zzz\"");
    }

    #[test]
    fn type_errors_name_the_nested_path() {
        let ty = CtyType::Object(BTreeMap::from([(
            "session_config".to_string(),
            CtyType::Object(BTreeMap::from([(
                "enabled_languages".to_string(),
                CtyType::List(Box::new(CtyType::String)),
            )])),
        )]));
        let v = V::Map(vec![(
            V::from("session_config"),
            V::Map(vec![(
                V::from("enabled_languages"),
                V::Array(vec![V::from("py"), V::from(3)]),
            )]),
        )]);
        let err = decode(&enc(&v), &ty).unwrap_err();
        assert_eq!(
            err.to_string(),
            "session_config.enabled_languages[1]: expected string, got number"
        );
    }

    #[test]
    fn truncated_garbage_and_trailing_bytes_are_errors() {
        assert_eq!(decode(&[], &CtyType::Dynamic), Err(CtyError::Empty));
        let err = decode(&[0x85, 0xa4, b'a'], &CtyType::Dynamic).unwrap_err();
        assert!(err.to_string().contains("truncated"), "{err}");
        // Garbage: an array header promising 3 items, then a uint64 marker without its bytes.
        assert!(matches!(
            decode(b"\x93\xff\xcf", &CtyType::Dynamic),
            Err(CtyError::Malformed(_))
        ));
        // Text is not one msgpack value: 'h' reads as the fixint 104, the rest is left over.
        assert_eq!(
            decode(b"hello world", &CtyType::Dynamic),
            Err(CtyError::TrailingBytes(10))
        );
        assert_eq!(
            decode(&[0xc0, 0xc0], &CtyType::Dynamic),
            Err(CtyError::TrailingBytes(1))
        );
    }

    #[test]
    fn deep_nesting_is_refused_without_overflow() {
        let mut bytes = vec![0x91; 10_000];
        bytes.push(0xc0);
        assert!(decode(&bytes, &CtyType::Dynamic).is_err());
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;

        fn arb_value() -> impl Strategy<Value = V> {
            let leaf = prop_oneof![
                Just(V::Nil),
                any::<bool>().prop_map(V::Boolean),
                any::<i64>().prop_map(V::from),
                any::<u64>().prop_map(V::from),
                any::<f64>().prop_map(V::F64),
                any::<f32>().prop_map(V::F32),
                "[a-z0-9.]{0,8}".prop_map(V::from),
                proptest::collection::vec(any::<u8>(), 0..8).prop_map(V::Binary),
                (any::<i8>(), proptest::collection::vec(any::<u8>(), 0..4))
                    .prop_map(|(t, d)| V::Ext(t, d)),
            ];
            leaf.prop_recursive(4, 32, 4, |inner| {
                prop_oneof![
                    proptest::collection::vec(inner.clone(), 0..4).prop_map(V::Array),
                    proptest::collection::vec(("[a-z]{1,4}".prop_map(V::from), inner), 0..4)
                        .prop_map(V::Map),
                ]
            })
        }

        proptest! {
            #[test]
            fn decoder_never_panics_on_any_value_or_type(v in arb_value()) {
                let bytes = enc(&v);
                for ty in [CtyType::Dynamic, CtyType::Number, CtyType::String,
                           CtyType::List(Box::new(CtyType::Number)),
                           CtyType::Map(Box::new(CtyType::Dynamic))] {
                    let _ = decode(&bytes, &ty);
                }
            }

            #[test]
            fn decoder_never_panics_on_random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
                let _ = decode(&bytes, &CtyType::Dynamic);
            }

            #[test]
            fn integers_round_trip_exactly(n in any::<i64>()) {
                prop_assert_eq!(decode(&enc(&V::from(n)), &CtyType::Number), Ok(CtyValue::Number(CtyNumber::Int(n.into()))));
                prop_assert_eq!(decode(&enc(&V::from(n.to_string())), &CtyType::Number), Ok(CtyValue::Number(CtyNumber::Int(n.into()))));
            }

            #[test]
            fn string_lists_round_trip(items in proptest::collection::vec("[ -~]{0,12}", 0..6)) {
                let v = V::Array(items.iter().map(|s| V::from(s.as_str())).collect());
                let want = CtyValue::List(items.iter().map(|s| CtyValue::String(s.clone())).collect());
                prop_assert_eq!(decode(&enc(&v), &CtyType::List(Box::new(CtyType::String))), Ok(want));
            }
        }
    }
}
