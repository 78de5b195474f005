//! Plays Nomad's side of config encoding: takes an operator config (JSON-like, HCL1 blocks may
//! be a list of one object), decodes it with the plugin's returned hclspec (defaults from
//! `Literal`s, nulls for absent attributes) and encodes the result as go-cty msgpack (sorted
//! object keys, compact integers, float64, decimal strings for inexact numbers).

use elide_task_driver::proto::hashicorp::nomad::plugins::shared::hclspec::{Spec, spec::Block};
use rmpv::Value as M;
use serde_json::Value as J;

use super::hcl;

/// Evaluates `spec` against `config` like hcldec, returning the resulting value.
pub fn eval(spec: &Spec, config: Option<&J>) -> Result<J, String> {
    let block = spec.block.as_ref().ok_or("empty spec")?;
    match block {
        Block::Object(o) => {
            let given = config.and_then(J::as_object);
            if let Some(given) = given {
                for k in given.keys() {
                    if !o.attributes.contains_key(k) {
                        return Err(format!(
                            "Unsupported argument; An argument named {k:?} is not expected here."
                        ));
                    }
                }
            }
            let mut out = serde_json::Map::new();
            for (k, child) in &o.attributes {
                let v = given.and_then(|g| g.get(k));
                out.insert(k.clone(), eval(child, v)?);
            }
            Ok(J::Object(out))
        }
        Block::Attr(a) => match config {
            None | Some(J::Null) if a.required => {
                Err(format!("Missing required argument {:?}", a.name))
            }
            None => Ok(J::Null),
            Some(v) => Ok(v.clone()),
        },
        Block::BlockValue(b) => {
            let nested = b.nested.as_deref().ok_or("block without nested spec")?;
            match config {
                None | Some(J::Null) => Ok(J::Null),
                // HCL1 turns a block into a list holding one object.
                Some(J::Array(items)) if items.len() == 1 => eval(nested, Some(&items[0])),
                Some(v) => eval(nested, Some(v)),
            }
        }
        Block::Default(d) => {
            let primary = eval(
                d.primary.as_deref().ok_or("default without primary")?,
                config,
            )?;
            if primary.is_null() {
                eval(d.default.as_deref().ok_or("default without default")?, None)
            } else {
                Ok(primary)
            }
        }
        Block::Literal(l) => hcl::parse(&l.value),
        other => Err(format!(
            "spec kind not supported by the test harness: {other:?}"
        )),
    }
}

/// cty msgpack encoding of a JSON-like value.
pub fn to_msgpack_value(v: &J) -> M {
    match v {
        J::Null => M::Nil,
        J::Bool(b) => M::Boolean(*b),
        J::Number(n) => {
            if let Some(i) = n.as_i64() {
                M::from(i)
            } else if let Some(u) = n.as_u64() {
                M::from(u)
            } else {
                M::F64(n.as_f64().unwrap_or(0.0))
            }
        }
        J::String(s) => M::from(s.as_str()),
        J::Array(items) => M::Array(items.iter().map(to_msgpack_value).collect()),
        // serde_json's Map is a BTreeMap: keys come out sorted, like cty's encoder.
        J::Object(map) => M::Map(
            map.iter()
                .map(|(k, v)| (M::from(k.as_str()), to_msgpack_value(v)))
                .collect(),
        ),
    }
}

/// Encodes an rmpv value to bytes.
pub fn encode(v: &M) -> Vec<u8> {
    let mut out = Vec::new();
    rmpv::encode::write_value(&mut out, v).expect("writing to a Vec cannot fail");
    out
}

/// What Nomad sends in SetConfig for `config` under `spec`.
pub fn encode_config(spec: &Spec, config: &J) -> Result<Vec<u8>, String> {
    let value = eval(spec, Some(config))?;
    Ok(encode(&to_msgpack_value(&value)))
}
