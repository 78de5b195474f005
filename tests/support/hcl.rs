//! A tiny evaluator for the HCL literal expressions we put in `Literal` specs (strings,
//! numbers, bools, null, tuples, objects): enough to apply spec defaults the way Nomad does,
//! and to prove every literal we return is a valid HCL expression.

use serde_json::{Map, Number, Value};

/// Parses one HCL literal expression.
pub fn parse(expr: &str) -> Result<Value, String> {
    let mut p = P {
        s: expr.as_bytes(),
        i: 0,
    };
    let v = p.value()?;
    p.ws();
    if p.i != p.s.len() {
        return Err(format!("trailing input at byte {} of {expr:?}", p.i));
    }
    Ok(v)
}

struct P<'a> {
    s: &'a [u8],
    i: usize,
}

impl P<'_> {
    fn ws(&mut self) {
        while self.s.get(self.i).is_some_and(|b| b.is_ascii_whitespace()) {
            self.i += 1;
        }
    }
    fn peek(&mut self) -> Option<u8> {
        self.ws();
        self.s.get(self.i).copied()
    }
    fn value(&mut self) -> Result<Value, String> {
        match self.peek() {
            Some(b'"') => self.string().map(Value::String),
            Some(b'[') => {
                self.i += 1;
                let mut items = Vec::new();
                loop {
                    if self.peek() == Some(b']') {
                        self.i += 1;
                        break;
                    }
                    items.push(self.value()?);
                    if self.peek() == Some(b',') {
                        self.i += 1;
                    }
                }
                Ok(Value::Array(items))
            }
            Some(b'{') => {
                self.i += 1;
                let mut obj = Map::new();
                loop {
                    match self.peek() {
                        Some(b'}') => {
                            self.i += 1;
                            break;
                        }
                        Some(b',') => {
                            self.i += 1;
                            continue;
                        }
                        None => return Err("unterminated object".into()),
                        _ => {}
                    }
                    let key = if self.peek() == Some(b'"') {
                        self.string()?
                    } else {
                        self.ident()?
                    };
                    match self.peek() {
                        Some(b'=') | Some(b':') => self.i += 1,
                        _ => return Err(format!("expected = after key {key:?}")),
                    }
                    let v = self.value()?;
                    obj.insert(key, v);
                }
                Ok(Value::Object(obj))
            }
            Some(c) if c == b'-' || c.is_ascii_digit() => {
                let start = self.i;
                self.i += 1;
                while self.s.get(self.i).is_some_and(|b| {
                    b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'+' | b'-')
                }) {
                    self.i += 1;
                }
                let text =
                    std::str::from_utf8(&self.s[start..self.i]).map_err(|e| e.to_string())?;
                if let Ok(i) = text.parse::<i64>() {
                    return Ok(Value::Number(i.into()));
                }
                let f: f64 = text.parse().map_err(|_| format!("bad number {text:?}"))?;
                Number::from_f64(f)
                    .map(Value::Number)
                    .ok_or_else(|| format!("bad number {text:?}"))
            }
            Some(_) => {
                let word = self.ident()?;
                match word.as_str() {
                    "true" => Ok(Value::Bool(true)),
                    "false" => Ok(Value::Bool(false)),
                    "null" => Ok(Value::Null),
                    other => Err(format!(
                        "unsupported expression {other:?} (strings need quotes)"
                    )),
                }
            }
            None => Err("empty expression".into()),
        }
    }
    fn ident(&mut self) -> Result<String, String> {
        self.ws();
        let start = self.i;
        while self
            .s
            .get(self.i)
            .is_some_and(|b| b.is_ascii_alphanumeric() || *b == b'_' || *b == b'-')
        {
            self.i += 1;
        }
        if self.i == start {
            return Err(format!("expected identifier at byte {start}"));
        }
        Ok(String::from_utf8_lossy(&self.s[start..self.i]).into_owned())
    }
    fn string(&mut self) -> Result<String, String> {
        self.ws();
        self.i += 1; // opening quote
        let mut out = Vec::new();
        loop {
            match self.s.get(self.i) {
                None => return Err("unterminated string".into()),
                Some(b'"') => {
                    self.i += 1;
                    break;
                }
                Some(b'\\') => {
                    let esc = self.s.get(self.i + 1).ok_or("dangling escape")?;
                    out.push(match esc {
                        b'n' => b'\n',
                        b't' => b'\t',
                        other => *other,
                    });
                    self.i += 2;
                }
                Some(b) => {
                    out.push(*b);
                    self.i += 1;
                }
            }
        }
        String::from_utf8(out).map_err(|e| e.to_string())
    }
}
