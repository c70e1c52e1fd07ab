//! The one SQL interface the store's operations are written against, so the same operation
//! code (its statements, its compare-and-sets, its transaction shape) runs on SQLite and on
//! PostgreSQL.
//!
//! Why our own small layer rather than a crate: the operations are synchronous code that runs
//! inside the writer's group commit (one transaction, a savepoint per request) and on read
//! connections; the SQL crates that speak both engines (sqlx's `Any`) are async-only and
//! would replace rusqlite, whose in-process reads the hot path is measured on. What differs
//! between the engines is small and handled here or where the SQL is written:
//!
//! * placeholders: statements are written with SQLite's `?N` (and bare `?`); PostgreSQL gets
//!   them as `$N` ([`numbered`]);
//! * values: [`Arg`] in, [`Val`] out. PostgreSQL types every parameter, so an [`Arg`] takes
//!   the type the statement gives it (an integer into `BIGINT`, `INTEGER` or `BOOLEAN`);
//! * the few functions the engines spell differently (JSON, text search) are chosen by
//!   [`Dialect`] where the statement is written.

use std::borrow::Cow;

use super::{Result, StoreError};

/// Which engine a [`Db`] speaks to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    /// SQLite (the embedded default).
    Sqlite,
    /// PostgreSQL (several daemons, one inventory).
    Postgres,
}

/// A statement's parameter.
#[derive(Clone, Debug, PartialEq)]
pub enum Arg<'a> {
    /// SQL NULL.
    Null,
    /// An integer (booleans are 0 and 1, as SQLite stores them).
    Int(i64),
    /// Text.
    Text(Cow<'a, str>),
    /// A floating-point number.
    Real(f64),
    /// Bytes.
    Blob(Cow<'a, [u8]>),
}

/// A value that can be a statement's parameter, borrowed (as rusqlite's `params!` borrows).
pub trait ToArg {
    /// The parameter.
    fn to_arg(&self) -> Arg<'_>;
}

impl ToArg for i64 {
    fn to_arg(&self) -> Arg<'_> {
        Arg::Int(*self)
    }
}

impl ToArg for bool {
    fn to_arg(&self) -> Arg<'_> {
        Arg::Int(*self as i64)
    }
}

impl ToArg for str {
    fn to_arg(&self) -> Arg<'_> {
        Arg::Text(Cow::Borrowed(self))
    }
}

impl ToArg for String {
    fn to_arg(&self) -> Arg<'_> {
        Arg::Text(Cow::Borrowed(self))
    }
}

impl ToArg for Val {
    fn to_arg(&self) -> Arg<'_> {
        Arg::from(self)
    }
}

impl<T: ToArg + ?Sized> ToArg for &T {
    fn to_arg(&self) -> Arg<'_> {
        (**self).to_arg()
    }
}

impl<T: ToArg> ToArg for Option<T> {
    fn to_arg(&self) -> Arg<'_> {
        self.as_ref().map_or(Arg::Null, ToArg::to_arg)
    }
}

impl From<String> for Arg<'_> {
    fn from(v: String) -> Self {
        Arg::Text(Cow::Owned(v))
    }
}

impl<'a> From<&'a Val> for Arg<'a> {
    /// A value read back as a parameter (a key read by one statement for the next).
    fn from(v: &'a Val) -> Self {
        match v {
            Val::Null => Arg::Null,
            Val::Int(i) => Arg::Int(*i),
            Val::Text(t) => Arg::Text(Cow::Borrowed(t)),
            Val::Real(r) => Arg::Real(*r),
            Val::Blob(b) => Arg::Blob(Cow::Borrowed(b)),
        }
    }
}

/// `args![a, b, c]`: the parameters of a statement, each borrowed with [`ToArg`].
macro_rules! args {
    () => { &[] as &[$crate::store::db::Arg<'_>] };
    ($($v:expr),+ $(,)?) => {
        &[$($crate::store::db::ToArg::to_arg(&$v)),+] as &[$crate::store::db::Arg<'_>]
    };
}
pub(crate) use args;

/// A value read from a row.
#[derive(Clone, Debug, PartialEq)]
pub enum Val {
    /// SQL NULL.
    Null,
    /// An integer (PostgreSQL's booleans read as 0 and 1).
    Int(i64),
    /// A floating-point number.
    Real(f64),
    /// Text.
    Text(String),
    /// Bytes.
    Blob(Vec<u8>),
}

/// One row of a result, owned.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SqlRow(pub Vec<Val>);

impl SqlRow {
    /// Column `i` as `T`; an error names the column's position and what it held.
    pub fn get<T: FromVal>(&self, i: usize) -> Result<T> {
        let v = self.0.get(i).unwrap_or(&Val::Null);
        T::from_val(v).ok_or_else(|| {
            StoreError::Database(format!(
                "column {i} holds {v:?}, not {}",
                std::any::type_name::<T>()
            ))
        })
    }

    /// Column `i`, a JSON text, parsed (`column` names it in the error).
    pub fn json<T: serde::de::DeserializeOwned>(
        &self,
        i: usize,
        column: &'static str,
    ) -> Result<T> {
        let text: Option<String> = self.get(i)?;
        serde_json::from_str(text.as_deref().unwrap_or("[]"))
            .map_err(|e| StoreError::Corrupt(column, e.to_string()))
    }

    /// Column `i`, text parsed with `FromStr` (`column` names it in the error).
    pub fn parsed<T: std::str::FromStr>(&self, i: usize, column: &'static str) -> Result<T>
    where
        T::Err: std::fmt::Display,
    {
        let text: String = self.get(i)?;
        text.parse()
            .map_err(|e: T::Err| StoreError::Corrupt(column, e.to_string()))
    }

    /// Column `i`, text or NULL, parsed with `FromStr`.
    pub fn parsed_opt<T: std::str::FromStr>(
        &self,
        i: usize,
        column: &'static str,
    ) -> Result<Option<T>>
    where
        T::Err: std::fmt::Display,
    {
        let text: Option<String> = self.get(i)?;
        text.map(|t| {
            t.parse()
                .map_err(|e: T::Err| StoreError::Corrupt(column, e.to_string()))
        })
        .transpose()
    }
}

/// A Rust value a [`Val`] converts to.
pub trait FromVal: Sized {
    /// `None` when `v` is not of this type.
    fn from_val(v: &Val) -> Option<Self>;
}

impl FromVal for i64 {
    fn from_val(v: &Val) -> Option<Self> {
        match v {
            Val::Int(i) => Some(*i),
            _ => None,
        }
    }
}

impl FromVal for bool {
    fn from_val(v: &Val) -> Option<Self> {
        match v {
            Val::Int(i) => Some(*i != 0),
            _ => None,
        }
    }
}

impl FromVal for String {
    fn from_val(v: &Val) -> Option<Self> {
        match v {
            Val::Text(t) => Some(t.clone()),
            _ => None,
        }
    }
}

impl FromVal for Vec<u8> {
    fn from_val(v: &Val) -> Option<Self> {
        match v {
            Val::Blob(b) => Some(b.clone()),
            _ => None,
        }
    }
}

impl ToArg for [u8] {
    fn to_arg(&self) -> Arg<'_> {
        Arg::Blob(Cow::Borrowed(self))
    }
}

impl ToArg for Vec<u8> {
    fn to_arg(&self) -> Arg<'_> {
        Arg::Blob(Cow::Borrowed(self))
    }
}

impl FromVal for Val {
    fn from_val(v: &Val) -> Option<Self> {
        Some(v.clone())
    }
}

impl<T: FromVal> FromVal for Option<T> {
    fn from_val(v: &Val) -> Option<Self> {
        match v {
            Val::Null => Some(None),
            v => T::from_val(v).map(Some),
        }
    }
}

/// A connection (or the transaction open on it) that runs the store's SQL.
pub trait Db {
    /// The engine behind it.
    fn dialect(&self) -> Dialect;
    /// Runs one statement; returns the rows it changed.
    fn exec(&self, sql: &str, args: &[Arg<'_>]) -> Result<u64>;
    /// Runs one query; returns every row.
    fn query(&self, sql: &str, args: &[Arg<'_>]) -> Result<Vec<SqlRow>>;
    /// Runs a query made for one use (a search whose text varies with its filter): not kept
    /// among the prepared statements, which would fill with statements never run again.
    fn query_once(&self, sql: &str, args: &[Arg<'_>]) -> Result<Vec<SqlRow>>;
    /// Runs statements without parameters (`BEGIN`, `SAVEPOINT x`, DDL).
    fn batch(&self, sql: &str) -> Result<()>;
}

impl dyn Db + '_ {
    /// The first row, if any.
    pub fn opt(&self, sql: &str, args: &[Arg<'_>]) -> Result<Option<SqlRow>> {
        Ok(self.query(sql, args)?.into_iter().next())
    }

    /// The first row; an error if there is none.
    pub fn one(&self, sql: &str, args: &[Arg<'_>]) -> Result<SqlRow> {
        self.opt(sql, args)?
            .ok_or_else(|| StoreError::Database(format!("no row from {}", first_line(sql))))
    }

    /// The first column of the first row.
    pub fn scalar<T: FromVal>(&self, sql: &str, args: &[Arg<'_>]) -> Result<T> {
        self.one(sql, args)?.get(0)
    }

    /// Whether the query returns a row.
    pub fn exists(&self, sql: &str, args: &[Arg<'_>]) -> Result<bool> {
        Ok(self.opt(sql, args)?.is_some())
    }

    /// The first column of every row.
    pub fn column<T: FromVal>(&self, sql: &str, args: &[Arg<'_>]) -> Result<Vec<T>> {
        self.query(sql, args)?.iter().map(|r| r.get(0)).collect()
    }

    /// The first column of every row of a query made for one use (see [`Db::query_once`]).
    pub fn column_once<T: FromVal>(&self, sql: &str, args: &[Arg<'_>]) -> Result<Vec<T>> {
        self.query_once(sql, args)?
            .iter()
            .map(|r| r.get(0))
            .collect()
    }
}

fn first_line(sql: &str) -> &str {
    sql.trim().lines().next().unwrap_or_default()
}

/// `sql` with SQLite's `?N` and bare `?` placeholders written as PostgreSQL's `$N` (a bare
/// `?` takes the number after the highest before it, as SQLite numbers them). Quoted text
/// and identifiers are left alone.
pub fn numbered(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 8);
    let mut highest = 0u32;
    let mut chars = sql.chars().peekable();
    let mut quote: Option<char> = None;
    while let Some(ch) = chars.next() {
        if let Some(q) = quote {
            out.push(ch);
            if ch == q {
                quote = None;
            }
            continue;
        }
        match ch {
            '\'' | '"' => {
                quote = Some(ch);
                out.push(ch);
            }
            '?' => {
                let mut digits = String::new();
                while let Some(d) = chars.peek().filter(|d| d.is_ascii_digit()) {
                    digits.push(*d);
                    chars.next();
                }
                let n = match digits.parse::<u32>() {
                    Ok(n) => n,
                    Err(_) => highest + 1,
                };
                highest = highest.max(n);
                out.push('$');
                out.push_str(&n.to_string());
            }
            _ => out.push(ch),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_numbered_as_sqlite_numbers_them() {
        assert_eq!(
            numbered("SELECT ?1, ?2 WHERE a = ?1 AND b = '?3' AND \"c?\" = ?"),
            "SELECT $1, $2 WHERE a = $1 AND b = '?3' AND \"c?\" = $3"
        );
        assert_eq!(
            numbered("x = ? AND y = ? OR z = ?"),
            "x = $1 AND y = $2 OR z = $3"
        );
        assert_eq!(numbered("no placeholders"), "no placeholders");
    }

    #[test]
    fn a_row_says_what_a_column_held_when_it_is_not_the_type_asked() {
        let row = SqlRow(vec![Val::Int(3), Val::Null, Val::Text("x".into())]);
        assert_eq!(row.get::<i64>(0).unwrap(), 3);
        assert_eq!(row.get::<Option<String>>(1).unwrap(), None);
        assert!(row.get::<bool>(0).unwrap());
        let e = row.get::<i64>(2).unwrap_err().to_string();
        assert!(e.contains("column 2 holds Text(\"x\")"), "{e}");
        let e = row.get::<i64>(1).unwrap_err().to_string();
        assert!(e.contains("Null"), "{e}");
    }
}
