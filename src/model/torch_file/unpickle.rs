//! A pickle interpreter that builds data and never runs anything: the subset of Python's pickle
//! that `torch.save` writes for tensors and plain containers.
//!
//! Every opcode is interpreted here, in Rust; nothing is imported or called. A `GLOBAL` (or
//! `STACK_GLOBAL`) naming anything outside [`ALLOWED_GLOBALS`] — PyTorch's tensor-rebuilding
//! functions, its storage classes and `collections.OrderedDict`, about what
//! `torch.load(weights_only=True)` accepts — stops the reading with [`Refusal`], naming the
//! callable and the byte where it appeared; so does an opcode that would instantiate or call
//! something (`INST`, `OBJ`, `EXT*`, out-of-band buffers) and a `REDUCE`/`NEWOBJ` whose callable
//! is not one of the rebuilding functions. Lengths read from the pickle are checked against the
//! bytes left before anything is allocated, and the number of values built is bounded, so a
//! hostile pickle can neither run code nor exhaust memory.

use std::collections::HashMap;
use std::rc::Rc;

/// `(module, name)` of the globals a PyTorch weights file may name.
pub const ALLOWED_GLOBALS: &[(&str, &str)] = &[
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch._tensor", "_rebuild_from_type_v2"),
    ("torch", "Tensor"),
    ("torch.nn.parameter", "Parameter"),
    ("torch", "FloatStorage"),
    ("torch", "DoubleStorage"),
    ("torch", "HalfStorage"),
    ("torch", "BFloat16Storage"),
    ("torch", "LongStorage"),
    ("torch", "IntStorage"),
    ("torch", "ShortStorage"),
    ("torch", "CharStorage"),
    ("torch", "ByteStorage"),
    ("torch", "BoolStorage"),
];

/// Most values one pickle may build (a real state dict of Stable Diffusion builds ~100,000).
const MAX_VALUES: usize = 50_000_000;
/// Deepest nesting of containers (PyTorch's files nest a few levels): deeper values would overflow
/// the stack when dropped or compared.
const MAX_DEPTH: u32 = 256;
/// Deepest nesting of marks and containers on the stack.
const MAX_STACK: usize = 1_000_000;

/// A container's items and how deeply it nests (1 + its deepest item's depth).
#[derive(Debug, Clone, PartialEq)]
pub struct Seq<T> {
    items: Vec<T>,
    depth: u32,
}

impl<T> Default for Seq<T> {
    fn default() -> Self {
        Self {
            items: Vec::new(),
            depth: 1,
        }
    }
}

impl<T> std::ops::Deref for Seq<T> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        &self.items
    }
}

/// A value's nesting depth, for [`Seq`].
pub trait Depth {
    fn depth(&self) -> u32;
}

impl Depth for Value {
    fn depth(&self) -> u32 {
        match self {
            Value::Tuple(seq) | Value::List(seq) => seq.depth,
            Value::Dict(seq) => seq.depth,
            Value::Tensor(_) => 2,
            Value::Storage(_) => 1,
            _ => 0,
        }
    }
}

impl Depth for (Value, Value) {
    fn depth(&self) -> u32 {
        self.0.depth().max(self.1.depth())
    }
}

impl<T: Depth> Seq<T> {
    fn new(items: Vec<T>) -> Self {
        let depth = 1 + items.iter().map(Depth::depth).max().unwrap_or(0);
        Self { items, depth }
    }

    fn extend(&mut self, items: impl IntoIterator<Item = T>) {
        for item in items {
            self.depth = self.depth.max(1 + item.depth());
            self.items.push(item);
        }
    }
}

/// Items in a container.
pub type Items = Rc<Seq<Value>>;
/// Key-value pairs in insertion order (dicts and `OrderedDict`s).
pub type Pairs = Rc<Seq<(Value, Value)>>;

/// A value the pickle built. Containers are shared (`Rc`) so that memo references cost nothing.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Items),
    List(Items),
    /// Key-value pairs in insertion order (dicts and `OrderedDict`s).
    Dict(Pairs),
    /// A global allowed by [`ALLOWED_GLOBALS`] (never called: only recognised).
    Global(&'static str, &'static str),
    /// A storage named by a persistent id: `('storage', class, key, location, numel)`.
    Storage(Rc<StorageRef>),
    /// A tensor rebuilt by `_rebuild_tensor_v2` and friends.
    Tensor(Rc<TensorRef>),
    /// The stack mark.
    Mark,
}

/// A storage of the file: which record holds it, its element type and its length in elements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageRef {
    /// The storage class's name (`FloatStorage`).
    pub class: &'static str,
    /// The record key (`data/<key>` in a zip archive).
    pub key: String,
    /// Elements in the storage.
    pub numel: u64,
}

/// A tensor as a view of a storage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorRef {
    pub storage: Rc<StorageRef>,
    /// First element, in elements of the storage.
    pub offset: u64,
    pub shape: Vec<u64>,
    pub stride: Vec<u64>,
}

/// Why a pickle was not read. `at` is the byte offset in the pickle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Something that would run code: a global outside the whitelist, a call of something that
    /// is not a tensor-rebuilding function, an opcode that instantiates or imports.
    Unsafe { at: usize, what: String },
    /// Malformed or unsupported data (a short pickle, a bad length, an unknown opcode, a type
    /// error in a rebuilding call).
    Invalid { at: usize, reason: String },
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Unsafe { at, what } => write!(
                f,
                "its pickle would run code: {what} (at byte {at}); nothing was run. Only \
                 PyTorch's tensor-rebuilding functions are allowed"
            ),
            Refusal::Invalid { at, reason } => {
                write!(f, "its pickle is not valid: {reason} (at byte {at})")
            }
        }
    }
}

/// Interprets `data` (one pickle, up to its `STOP`) and returns the value it builds.
pub fn unpickle(data: &[u8]) -> Result<Value, Refusal> {
    Machine {
        data,
        pos: 0,
        stack: Vec::new(),
        memo: HashMap::new(),
        built: 0,
    }
    .run()
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    memo: HashMap<u64, Value>,
    built: usize,
}

fn allowed_global(module: &str, name: &str) -> Option<(&'static str, &'static str)> {
    ALLOWED_GLOBALS
        .iter()
        .copied()
        .find(|(m, n)| *m == module && *n == name)
}

impl<'a> Machine<'a> {
    fn invalid(&self, at: usize, reason: impl Into<String>) -> Refusal {
        Refusal::Invalid {
            at,
            reason: reason.into(),
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], Refusal> {
        let start = self.pos;
        let data: &'a [u8] = self.data;
        match start.checked_add(n).filter(|&end| end <= data.len()) {
            Some(end) => {
                self.pos = end;
                Ok(&data[start..end])
            }
            None => Err(self.invalid(
                start,
                format!(
                    "it needs {n} more bytes but only {} are left (a truncated file?)",
                    data.len() - start.min(data.len())
                ),
            )),
        }
    }

    fn u8(&mut self) -> Result<u8, Refusal> {
        Ok(self.take(1)?[0])
    }

    fn le<const N: usize>(&mut self) -> Result<[u8; N], Refusal> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn line(&mut self) -> Result<&'a [u8], Refusal> {
        let start = self.pos;
        let rest = &self.data[start..];
        match rest.iter().position(|&b| b == b'\n') {
            Some(end) => {
                self.pos = start + end + 1;
                let line = &rest[..end];
                Ok(line.strip_suffix(b"\r").unwrap_or(line))
            }
            None => Err(self.invalid(start, "a text argument has no end of line")),
        }
    }

    /// A length argument, checked against the bytes left before anything is allocated.
    fn length(&mut self, len: u64, at: usize) -> Result<usize, Refusal> {
        let left = (self.data.len() - self.pos) as u64;
        if len > left {
            return Err(self.invalid(
                at,
                format!("a length of {len} bytes, but only {left} bytes are left"),
            ));
        }
        Ok(len as usize)
    }

    fn text(&self, bytes: &[u8], at: usize) -> Result<String, Refusal> {
        String::from_utf8(bytes.to_vec()).map_err(|_| self.invalid(at, "a string is not UTF-8"))
    }

    fn push(&mut self, value: Value, at: usize) -> Result<(), Refusal> {
        if value.depth() > MAX_DEPTH {
            return Err(self.invalid(
                at,
                format!("its values nest deeper than {MAX_DEPTH} levels"),
            ));
        }
        self.built += 1;
        if self.built > MAX_VALUES {
            return Err(self.invalid(at, format!("it builds more than {MAX_VALUES} values")));
        }
        if self.stack.len() >= MAX_STACK {
            return Err(self.invalid(at, format!("its stack grows beyond {MAX_STACK} values")));
        }
        self.stack.push(value);
        Ok(())
    }

    fn pop(&mut self, at: usize) -> Result<Value, Refusal> {
        match self.stack.pop() {
            Some(Value::Mark) | None => {
                Err(self.invalid(at, "an opcode found no value on the stack"))
            }
            Some(value) => Ok(value),
        }
    }

    fn pop_to_mark(&mut self, at: usize) -> Result<Vec<Value>, Refusal> {
        match self.stack.iter().rposition(|v| *v == Value::Mark) {
            Some(mark) => {
                let items = self.stack.split_off(mark + 1);
                self.stack.pop();
                Ok(items)
            }
            None => Err(self.invalid(at, "no mark on the stack")),
        }
    }

    fn top(&mut self, at: usize) -> Result<&mut Value, Refusal> {
        match self.stack.last_mut() {
            Some(Value::Mark) | None => Err(Refusal::Invalid {
                at,
                reason: "an opcode found no container on the stack".into(),
            }),
            Some(value) => Ok(value),
        }
    }

    /// A copy of the value on top of the stack; `reason` refuses a mark or an empty stack.
    fn copy_of_top(&self, at: usize, reason: &str) -> Result<Value, Refusal> {
        match self.stack.last() {
            Some(Value::Mark) | None => Err(self.invalid(at, reason)),
            Some(value) => Ok(value.clone()),
        }
    }

    fn memo_get(&mut self, key: u64, at: usize) -> Result<(), Refusal> {
        let value = self
            .memo
            .get(&key)
            .cloned()
            .ok_or_else(|| self.invalid(at, format!("memo entry {key} is not set")))?;
        self.push(value, at)
    }

    fn memo_put(&mut self, key: u64, at: usize) -> Result<(), Refusal> {
        let value = self.copy_of_top(at, "nothing to memoize on the stack")?;
        self.memo.insert(key, value);
        Ok(())
    }

    /// The memo key of a text GET or PUT (`op`): the decimal number on the rest of the line.
    fn text_memo_key(&mut self, at: usize, op: &str) -> Result<u64, Refusal> {
        let line = self.line()?;
        self.text(line, at)?
            .parse()
            .map_err(|_| self.invalid(at, format!("{op} of a bad key")))
    }

    fn global(&mut self, module: &str, name: &str, at: usize) -> Result<(), Refusal> {
        match allowed_global(module, name) {
            Some((m, n)) => self.push(Value::Global(m, n), at),
            None => Err(Refusal::Unsafe {
                at,
                what: format!("GLOBAL {module}.{name}"),
            }),
        }
    }

    fn run(mut self) -> Result<Value, Refusal> {
        loop {
            let at = self.pos;
            let op = self.data.get(at).copied().ok_or_else(|| {
                self.invalid(
                    at,
                    "the pickle ends before its STOP opcode (a truncated file?)",
                )
            })?;
            self.pos += 1;
            match op {
                0x80 => {
                    // PROTO
                    let version = self.u8()?;
                    if version > 5 {
                        return Err(
                            self.invalid(at, format!("pickle protocol {version} is unknown"))
                        );
                    }
                }
                0x95 => {
                    // FRAME: a hint only.
                    self.le::<8>()?;
                }
                b'.' => {
                    // STOP
                    let value = self.pop(at)?;
                    return Ok(value);
                }
                // --- constants and numbers ---
                b'N' => self.push(Value::None, at)?,
                0x88 => self.push(Value::Bool(true), at)?,
                0x89 => self.push(Value::Bool(false), at)?,
                b'K' => {
                    let v = self.u8()?;
                    self.push(Value::Int(i64::from(v)), at)?;
                }
                b'M' => {
                    let v = u16::from_le_bytes(self.le()?);
                    self.push(Value::Int(i64::from(v)), at)?;
                }
                b'J' => {
                    let v = i32::from_le_bytes(self.le()?);
                    self.push(Value::Int(i64::from(v)), at)?;
                }
                0x8a => {
                    // LONG1: little-endian two's complement of n bytes.
                    let n = usize::from(self.u8()?);
                    let bytes = self.take(n)?;
                    let value = long_from_bytes(bytes)
                        .ok_or_else(|| self.invalid(at, "an integer wider than 64 bits"))?;
                    self.push(Value::Int(value), at)?;
                }
                0x8b => {
                    // LONG4
                    let n = u32::from_le_bytes(self.le()?);
                    let n = self.length(u64::from(n), at)?;
                    let bytes = self.take(n)?;
                    let value = long_from_bytes(bytes)
                        .ok_or_else(|| self.invalid(at, "an integer wider than 64 bits"))?;
                    self.push(Value::Int(value), at)?;
                }
                b'I' | b'L' => {
                    // INT / LONG (text): `01`/`00` are True/False in protocol 0.
                    let line = self.line()?;
                    let text = self.text(line, at)?;
                    let text = text.trim_end_matches('L');
                    let value = match text {
                        "01" if op == b'I' => Value::Bool(true),
                        "00" if op == b'I' => Value::Bool(false),
                        _ => Value::Int(text.parse().map_err(|_| {
                            self.invalid(at, format!("{text:?} is not an integer"))
                        })?),
                    };
                    self.push(value, at)?;
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.le()?);
                    self.push(Value::Float(v), at)?;
                }
                b'F' => {
                    let line = self.line()?;
                    let text = self.text(line, at)?;
                    let v = text
                        .parse()
                        .map_err(|_| self.invalid(at, format!("{text:?} is not a number")))?;
                    self.push(Value::Float(v), at)?;
                }
                // --- strings and bytes ---
                b'X' => {
                    let n = u32::from_le_bytes(self.le()?);
                    let n = self.length(u64::from(n), at)?;
                    let bytes = self.take(n)?;
                    let s = self.text(bytes, at)?;
                    self.push(Value::Str(s), at)?;
                }
                0x8c => {
                    // SHORT_BINUNICODE
                    let n = usize::from(self.u8()?);
                    let bytes = self.take(n)?;
                    let s = self.text(bytes, at)?;
                    self.push(Value::Str(s), at)?;
                }
                0x8d => {
                    // BINUNICODE8
                    let n = u64::from_le_bytes(self.le()?);
                    let n = self.length(n, at)?;
                    let bytes = self.take(n)?;
                    let s = self.text(bytes, at)?;
                    self.push(Value::Str(s), at)?;
                }
                b'V' => {
                    // UNICODE (raw-unicode-escaped text): plain ASCII only.
                    let line = self.line()?;
                    if line.contains(&b'\\') {
                        return Err(self.invalid(at, "escaped UNICODE strings are not supported"));
                    }
                    let s = self.text(line, at)?;
                    self.push(Value::Str(s), at)?;
                }
                b'T' | b'B' => {
                    // BINSTRING / BINBYTES (4-byte length)
                    let n = u32::from_le_bytes(self.le()?);
                    let n = self.length(u64::from(n), at)?;
                    let bytes = self.take(n)?.to_vec();
                    self.push(Value::Bytes(bytes), at)?;
                }
                b'U' | b'C' => {
                    // SHORT_BINSTRING / SHORT_BINBYTES
                    let n = usize::from(self.u8()?);
                    let bytes = self.take(n)?.to_vec();
                    self.push(Value::Bytes(bytes), at)?;
                }
                0x8e => {
                    // BINBYTES8
                    let n = u64::from_le_bytes(self.le()?);
                    let n = self.length(n, at)?;
                    let bytes = self.take(n)?.to_vec();
                    self.push(Value::Bytes(bytes), at)?;
                }
                // --- containers ---
                b'(' => self.push(Value::Mark, at)?,
                b')' => self.push(Value::Tuple(Rc::default()), at)?,
                b't' => {
                    let items = self.pop_to_mark(at)?;
                    self.push(Value::Tuple(Rc::new(Seq::new(items))), at)?;
                }
                0x85..=0x87 => {
                    let n = usize::from(op - 0x84);
                    if self.stack.len() < n
                        || self.stack[self.stack.len() - n..].contains(&Value::Mark)
                    {
                        return Err(self.invalid(at, "a TUPLE opcode found too few values"));
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.push(Value::Tuple(Rc::new(Seq::new(items))), at)?;
                }
                b']' => self.push(Value::List(Rc::default()), at)?,
                b'l' => {
                    let items = self.pop_to_mark(at)?;
                    self.push(Value::List(Rc::new(Seq::new(items))), at)?;
                }
                b'a' => {
                    let value = self.pop(at)?;
                    match self.top(at)? {
                        Value::List(list) => Rc::make_mut(list).extend([value]),
                        _ => return Err(self.invalid(at, "APPEND to something that is not a list")),
                    }
                }
                b'e' => {
                    let items = self.pop_to_mark(at)?;
                    match self.top(at)? {
                        Value::List(list) => Rc::make_mut(list).extend(items),
                        _ => {
                            return Err(self.invalid(at, "APPENDS to something that is not a list"));
                        }
                    }
                }
                b'}' => self.push(Value::Dict(Rc::default()), at)?,
                b'd' => {
                    let items = self.pop_to_mark(at)?;
                    let pairs = pairs(items)
                        .ok_or_else(|| self.invalid(at, "DICT of an odd number of values"))?;
                    self.push(Value::Dict(Rc::new(Seq::new(pairs))), at)?;
                }
                b's' => {
                    let value = self.pop(at)?;
                    let key = self.pop(at)?;
                    match self.top(at)? {
                        Value::Dict(dict) => Rc::make_mut(dict).extend([(key, value)]),
                        _ => {
                            return Err(self.invalid(at, "SETITEM on something that is not a dict"));
                        }
                    }
                }
                b'u' => {
                    let items = self.pop_to_mark(at)?;
                    let new = pairs(items)
                        .ok_or_else(|| self.invalid(at, "SETITEMS of an odd number of values"))?;
                    match self.top(at)? {
                        Value::Dict(dict) => Rc::make_mut(dict).extend(new),
                        _ => {
                            return Err(
                                self.invalid(at, "SETITEMS on something that is not a dict")
                            );
                        }
                    }
                }
                0x8f => self.push(Value::List(Rc::default()), at)?, // EMPTY_SET, as a list
                0x90 => {
                    // ADDITEMS
                    let items = self.pop_to_mark(at)?;
                    match self.top(at)? {
                        Value::List(list) => Rc::make_mut(list).extend(items),
                        _ => {
                            return Err(self.invalid(at, "ADDITEMS to something that is not a set"));
                        }
                    }
                }
                0x91 => {
                    // FROZENSET
                    let items = self.pop_to_mark(at)?;
                    self.push(Value::List(Rc::new(Seq::new(items))), at)?;
                }
                // --- stack and memo ---
                b'0' => {
                    self.pop(at)?;
                }
                b'1' => {
                    self.pop_to_mark(at)?;
                }
                b'2' => {
                    let value = self.copy_of_top(at, "DUP of nothing")?;
                    self.push(value, at)?;
                }
                b'h' => {
                    let key = u64::from(self.u8()?);
                    self.memo_get(key, at)?;
                }
                b'j' => {
                    let key = u64::from(u32::from_le_bytes(self.le()?));
                    self.memo_get(key, at)?;
                }
                b'g' => {
                    let key = self.text_memo_key(at, "GET")?;
                    self.memo_get(key, at)?;
                }
                b'q' => {
                    let key = u64::from(self.u8()?);
                    self.memo_put(key, at)?;
                }
                b'r' => {
                    let key = u64::from(u32::from_le_bytes(self.le()?));
                    self.memo_put(key, at)?;
                }
                b'p' => {
                    let key = self.text_memo_key(at, "PUT")?;
                    self.memo_put(key, at)?;
                }
                0x94 => {
                    // MEMOIZE
                    let key = self.memo.len() as u64;
                    self.memo_put(key, at)?;
                }
                // --- globals and calls ---
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    let (module, name) = (self.text(module, at)?, self.text(name, at)?);
                    self.global(&module, &name, at)?;
                }
                0x93 => {
                    // STACK_GLOBAL
                    let name = self.pop(at)?;
                    let module = self.pop(at)?;
                    match (module, name) {
                        (Value::Str(module), Value::Str(name)) => {
                            self.global(&module, &name, at)?
                        }
                        _ => {
                            return Err(
                                self.invalid(at, "STACK_GLOBAL of values that are not strings")
                            );
                        }
                    }
                }
                b'R' => {
                    let args = self.pop(at)?;
                    let callable = self.pop(at)?;
                    let value = self.call(callable, args, at)?;
                    self.push(value, at)?;
                }
                0x81 => {
                    // NEWOBJ: cls.__new__(cls, *args); only OrderedDict.
                    let args = self.pop(at)?;
                    let class = self.pop(at)?;
                    let value = self.new_object(class, args, at)?;
                    self.push(value, at)?;
                }
                0x92 => {
                    // NEWOBJ_EX
                    let _kwargs = self.pop(at)?;
                    let args = self.pop(at)?;
                    let class = self.pop(at)?;
                    let value = self.new_object(class, args, at)?;
                    self.push(value, at)?;
                }
                b'b' => {
                    // BUILD: the state of dicts and tensors is dropped (OrderedDict's `_metadata`,
                    // a parameter's attributes); nothing is called.
                    let _state = self.pop(at)?;
                    match self.top(at)? {
                        Value::Dict(_) | Value::Tensor(_) => {}
                        _ => {
                            return Err(
                                self.invalid(at, "BUILD of something that is not a dict or tensor")
                            );
                        }
                    }
                }
                b'Q' => {
                    let pid = self.pop(at)?;
                    let storage = self.persistent(pid, at)?;
                    self.push(storage, at)?;
                }
                b'P' => {
                    return Err(self.invalid(at, "text persistent ids (PERSID) are not PyTorch's"));
                }
                b'i' => {
                    return Err(Refusal::Unsafe {
                        at,
                        what: "INST (instantiates a class)".into(),
                    });
                }
                b'o' => {
                    return Err(Refusal::Unsafe {
                        at,
                        what: "OBJ (instantiates a class)".into(),
                    });
                }
                0x82..=0x84 => {
                    return Err(Refusal::Unsafe {
                        at,
                        what: format!(
                            "EXT{} (imports through the extension registry)",
                            [1, 2, 4][usize::from(op - 0x82)]
                        ),
                    });
                }
                0x96..=0x98 => {
                    return Err(
                        self.invalid(at, "out-of-band buffers (protocol 5) are not supported")
                    );
                }
                other => {
                    return Err(self.invalid(at, format!("unknown opcode 0x{other:02x}")));
                }
            }
        }
    }

    /// A REDUCE: only the tensor-rebuilding functions and `OrderedDict()`.
    fn call(&self, callable: Value, args: Value, at: usize) -> Result<Value, Refusal> {
        let Value::Global(module, name) = callable else {
            return Err(Refusal::Unsafe {
                at,
                what: "REDUCE of something that is not a known function".into(),
            });
        };
        let Value::Tuple(args) = args else {
            return Err(self.invalid(
                at,
                format!("{module}.{name} called without an argument tuple"),
            ));
        };
        let bad = |reason: &str| self.invalid(at, format!("{module}.{name}: {reason}"));
        match (module, name) {
            ("collections", "OrderedDict") => {
                match args.first() {
                    None => Ok(Value::Dict(Rc::default())),
                    // OrderedDict([(k, v), ...])
                    Some(Value::List(items)) | Some(Value::Tuple(items)) => {
                        let mut out = Vec::with_capacity(items.len());
                        for item in items.iter() {
                            match item {
                                Value::Tuple(pair) if pair.len() == 2 => {
                                    out.push((pair[0].clone(), pair[1].clone()))
                                }
                                _ => return Err(bad("an item is not a key-value pair")),
                            }
                        }
                        Ok(Value::Dict(Rc::new(Seq::new(out))))
                    }
                    Some(_) => Err(bad("its argument is not a list of pairs")),
                }
            }
            ("torch._utils", "_rebuild_tensor") | ("torch._utils", "_rebuild_tensor_v2") => {
                // (storage, storage_offset, size, stride, ...)
                let [storage, offset, size, stride, ..] = &args[..] else {
                    return Err(bad("fewer than 4 arguments"));
                };
                let Value::Storage(storage) = storage else {
                    return Err(bad("its first argument is not a storage"));
                };
                let offset = non_negative(offset)
                    .ok_or_else(|| bad("the storage offset is not a whole number"))?;
                let shape = int_tuple(size)
                    .ok_or_else(|| bad("the size is not a tuple of whole numbers"))?;
                let stride = int_tuple(stride)
                    .ok_or_else(|| bad("the stride is not a tuple of whole numbers"))?;
                if shape.len() != stride.len() {
                    return Err(bad("size and stride have different lengths"));
                }
                Ok(Value::Tensor(Rc::new(TensorRef {
                    storage: storage.clone(),
                    offset,
                    shape,
                    stride,
                })))
            }
            ("torch._utils", "_rebuild_parameter")
            | ("torch._utils", "_rebuild_parameter_with_state") => match args.first() {
                Some(tensor @ Value::Tensor(_)) => Ok(tensor.clone()),
                _ => Err(bad("its first argument is not a tensor")),
            },
            ("torch._tensor", "_rebuild_from_type_v2") => {
                // (func, type, args, state): func(*args), then the type and state are dropped.
                let [func, class, inner, ..] = &args[..] else {
                    return Err(bad("fewer than 3 arguments"));
                };
                if !matches!(
                    class,
                    Value::Global("torch", "Tensor")
                        | Value::Global("torch.nn.parameter", "Parameter")
                ) {
                    return Err(Refusal::Unsafe {
                        at,
                        what: format!("{module}.{name} of a type that is not torch.Tensor"),
                    });
                }
                self.call(func.clone(), inner.clone(), at)
            }
            _ => Err(Refusal::Unsafe {
                at,
                what: format!("REDUCE of {module}.{name}, which is not a function"),
            }),
        }
    }

    fn new_object(&self, class: Value, _args: Value, at: usize) -> Result<Value, Refusal> {
        match class {
            Value::Global("collections", "OrderedDict") => Ok(Value::Dict(Rc::default())),
            Value::Global(module, name) => Err(Refusal::Unsafe {
                at,
                what: format!("NEWOBJ of {module}.{name}"),
            }),
            _ => Err(Refusal::Unsafe {
                at,
                what: "NEWOBJ of something that is not a known class".into(),
            }),
        }
    }

    /// PyTorch's persistent ids: `('storage', <storage class>, key, location, numel[, view])`.
    fn persistent(&self, pid: Value, at: usize) -> Result<Value, Refusal> {
        let bad = |reason: &str| self.invalid(at, format!("persistent id: {reason}"));
        let Value::Tuple(items) = pid else {
            return Err(bad("not a tuple"));
        };
        let [kind, class, key, _location, numel, ..] = &items[..] else {
            return Err(bad("fewer than 5 items"));
        };
        if *kind != Value::Str("storage".into()) {
            return Err(bad("not a storage"));
        }
        let Value::Global("torch", class) = class else {
            return Err(bad("its class is not a torch storage class"));
        };
        if !class.ends_with("Storage") {
            return Err(bad("its class is not a torch storage class"));
        }
        let key = match key {
            Value::Str(key) => key.clone(),
            Value::Int(key) => key.to_string(),
            _ => return Err(bad("its key is not a string")),
        };
        let numel = non_negative(numel).ok_or_else(|| bad("its size is not a whole number"))?;
        Ok(Value::Storage(Rc::new(StorageRef { class, key, numel })))
    }
}

fn pairs(mut items: Vec<Value>) -> Option<Vec<(Value, Value)>> {
    if !items.len().is_multiple_of(2) {
        return None;
    }
    let mut out = Vec::with_capacity(items.len() / 2);
    let mut iter = items.drain(..);
    while let (Some(k), Some(v)) = (iter.next(), iter.next()) {
        out.push((k, v));
    }
    Some(out)
}

fn non_negative(value: &Value) -> Option<u64> {
    match value {
        Value::Int(v) => u64::try_from(*v).ok(),
        _ => None,
    }
}

fn int_tuple(value: &Value) -> Option<Vec<u64>> {
    match value {
        Value::Tuple(items) | Value::List(items) => items.iter().map(non_negative).collect(),
        _ => None,
    }
}

/// A little-endian two's complement integer of up to 8 bytes (pickle's LONG1/LONG4).
fn long_from_bytes(bytes: &[u8]) -> Option<i64> {
    if bytes.is_empty() {
        return Some(0);
    }
    if bytes.len() > 8 {
        // Wider encodings of small numbers still fit when the extra bytes are sign extension.
        let (low, high) = bytes.split_at(8);
        let sign = if low[7] & 0x80 != 0 { 0xff } else { 0 };
        if high.iter().any(|&b| b != sign) {
            return None;
        }
        return long_from_bytes(low);
    }
    let mut buf = if bytes[bytes.len() - 1] & 0x80 != 0 {
        [0xffu8; 8]
    } else {
        [0u8; 8]
    };
    buf[..bytes.len()].copy_from_slice(bytes);
    Some(i64::from_le_bytes(buf))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refuses_unsafe(data: &[u8], needle: &str) {
        match unpickle(data) {
            Err(Refusal::Unsafe { what, .. }) => assert!(what.contains(needle), "{what}"),
            other => panic!("expected an unsafe refusal naming {needle}, got {other:?}"),
        }
    }

    #[test]
    fn a_global_outside_the_whitelist_is_refused_before_anything_else() {
        // Protocol 2: os.system('touch x') via GLOBAL + REDUCE.
        let mut data = b"\x80\x02cposix\nsystem\nq\x00X\x07\x00\x00\x00touch x\x85R.".to_vec();
        refuses_unsafe(&data, "posix.system");
        data = b"\x80\x02cbuiltins\neval\n.".to_vec();
        refuses_unsafe(&data, "builtins.eval");
        // Protocol 4: STACK_GLOBAL.
        data = b"\x80\x04\x8c\x02os\x94\x8c\x06system\x94\x93.".to_vec();
        refuses_unsafe(&data, "os.system");
        refuses_unsafe(b"\x80\x02(i__main__\nEvil\n.", "INST");
        refuses_unsafe(b"\x80\x02\x82\x01.", "EXT1");
        // A storage class is allowed as a name but not as a function.
        refuses_unsafe(b"\x80\x02ctorch\nFloatStorage\n)R.", "torch.FloatStorage");
    }

    #[test]
    fn lengths_beyond_the_data_are_refused_before_allocating() {
        let data = b"\x80\x02X\xff\xff\xff\xffabc.";
        match unpickle(data) {
            Err(Refusal::Invalid { reason, .. }) => assert!(reason.contains("only"), "{reason}"),
            other => panic!("{other:?}"),
        }
        let data = b"\x80\x04\x8e\xff\xff\xff\xff\xff\xff\xff\x7f.";
        assert!(matches!(unpickle(data), Err(Refusal::Invalid { .. })));
        assert!(matches!(
            unpickle(b"\x80\x02}q\x00"),
            Err(Refusal::Invalid { .. })
        ));
    }

    #[test]
    fn a_state_dict_of_tensors_is_rebuilt() {
        // {'w': _rebuild_tensor_v2(('storage', FloatStorage, '0', 'cpu', 6), 1, (2, 2), (1, 2), False, OrderedDict())}
        let mut data =
            b"\x80\x02}q\x00X\x01\x00\x00\x00wctorch._utils\n_rebuild_tensor_v2\n(".to_vec();
        data.extend(b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x06tQ");
        data.extend(b"K\x01K\x02K\x02\x86K\x01K\x02\x86\x89ccollections\nOrderedDict\n)RtRs.");
        let Value::Dict(dict) = unpickle(&data).expect("a valid pickle") else {
            panic!("not a dict");
        };
        let (Value::Str(name), Value::Tensor(tensor)) = &dict[0] else {
            panic!("{dict:?}");
        };
        assert_eq!(name, "w");
        assert_eq!(
            (tensor.offset, &tensor.shape[..], &tensor.stride[..]),
            (1, &[2, 2][..], &[1, 2][..])
        );
        assert_eq!(
            (
                tensor.storage.class,
                tensor.storage.key.as_str(),
                tensor.storage.numel
            ),
            ("FloatStorage", "0", 6)
        );
    }

    #[test]
    fn damaged_pickles_never_panic() {
        let mut data =
            b"\x80\x02}q\x00X\x01\x00\x00\x00wctorch._utils\n_rebuild_tensor_v2\n(".to_vec();
        data.extend(b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x06tQ");
        data.extend(b"K\x01K\x02K\x02\x86K\x01K\x02\x86\x89ccollections\nOrderedDict\n)RtRs.");
        let mut rng = crate::test_support::XorShift::new(0x9E37_79B9_7F4A_7C15);
        for _ in 0..3000 {
            let mut bytes = data.clone();
            match rng.below(3) {
                0 => {
                    let at = rng.below(bytes.len());
                    bytes[at] = rng.below(256) as u8;
                }
                1 => bytes.truncate(rng.below(bytes.len())),
                _ => {
                    let at = rng.below(bytes.len());
                    bytes.insert(at, rng.below(256) as u8);
                }
            }
            let _ = unpickle(&bytes);
        }
    }

    #[test]
    fn deep_nesting_is_refused_not_a_stack_overflow() {
        // ( then a million TUPLE1: each wraps the last in a 1-tuple.
        let mut data = b"\x80\x02N".to_vec();
        data.extend(std::iter::repeat_n(0x85u8, 1_000_000));
        data.push(b'.');
        match unpickle(&data) {
            Err(Refusal::Invalid { reason, .. }) => assert!(reason.contains("nest"), "{reason}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn long_integers() {
        assert_eq!(long_from_bytes(&[]), Some(0));
        assert_eq!(long_from_bytes(&[0xff]), Some(-1));
        assert_eq!(long_from_bytes(&[0x00, 0x01]), Some(256));
        assert_eq!(long_from_bytes(&[1, 0, 0, 0, 0, 0, 0, 0, 0]), Some(1));
        assert_eq!(long_from_bytes(&[1, 0, 0, 0, 0, 0, 0, 0, 1]), None);
    }
}
