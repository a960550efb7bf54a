//! What every export shares: typed errors and their status codes, the thread's last error,
//! reading C strings and byte ranges, writing into the caller's buffers, and catching panics.

use std::cell::RefCell;
use std::ffi::{c_char, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::SluiceStatus;

/// Status codes as the exports return them: the header's `SluiceStatus`, written once.
pub(crate) const OK: i32 = SluiceStatus::SLUICE_OK as i32;
pub(crate) const EMPTY: i32 = SluiceStatus::SLUICE_EMPTY as i32;
pub(crate) const TOO_SMALL: i32 = SluiceStatus::SLUICE_TOO_SMALL as i32;
pub(crate) const ERR_ARGUMENT: i32 = SluiceStatus::SLUICE_ERR_ARGUMENT as i32;
pub(crate) const ERR_CONFIG: i32 = SluiceStatus::SLUICE_ERR_CONFIG as i32;
pub(crate) const ERR_CREDENTIALS: i32 = SluiceStatus::SLUICE_ERR_CREDENTIALS as i32;
pub(crate) const ERR_POLICY: i32 = SluiceStatus::SLUICE_ERR_POLICY as i32;
pub(crate) const ERR_STATE: i32 = SluiceStatus::SLUICE_ERR_STATE as i32;
pub(crate) const ERR_IO: i32 = SluiceStatus::SLUICE_ERR_IO as i32;
pub(crate) const ERR_PANIC: i32 = SluiceStatus::SLUICE_ERR_PANIC as i32;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Argument(String),
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    Credentials(String),
    #[error("{0}")]
    Policy(String),
    #[error("{0}")]
    State(String),
    #[error("{0}")]
    Io(String),
}

impl Error {
    pub fn code(&self) -> i32 {
        match self {
            Error::Argument(_) => ERR_ARGUMENT,
            Error::Config(_) => ERR_CONFIG,
            Error::Credentials(_) => ERR_CREDENTIALS,
            Error::Policy(_) => ERR_POLICY,
            Error::State(_) => ERR_STATE,
            Error::Io(_) => ERR_IO,
        }
    }
}

thread_local! {
    static LAST_ERROR: RefCell<String> = const { RefCell::new(String::new()) };
}

pub fn set_last_error(text: String) {
    LAST_ERROR.with(|e| *e.borrow_mut() = text);
}

pub fn last_error() -> String {
    LAST_ERROR.with(|e| e.borrow().clone())
}

/// Runs an export's body: an error becomes its code (and the thread's last error), a panic
/// becomes ERR_PANIC; nothing unwinds into the caller.
pub fn guard(f: impl FnOnce() -> Result<i32, Error>) -> i32 {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(code)) => code,
        Ok(Err(e)) => {
            set_last_error(e.to_string());
            e.code()
        }
        Err(p) => {
            set_last_error(format!("panic in libsluice_apple: {}", panic_text(&*p)));
            ERR_PANIC
        }
    }
}

pub fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".into()
    }
}

/// A NUL-terminated UTF-8 argument.
///
/// # Safety
/// `p` is NULL or points at a NUL-terminated string that lives for `'a`.
pub unsafe fn str_arg<'a>(p: *const c_char, what: &str) -> Result<&'a str, Error> {
    if p.is_null() {
        return Err(Error::Argument(format!("{what} is NULL")));
    }
    // SAFETY: the caller's promise above.
    unsafe { CStr::from_ptr(p) }
        .to_str()
        .map_err(|e| Error::Argument(format!("{what} is not UTF-8: {e}")))
}

/// A byte range argument (NULL is fine when `len` is 0).
///
/// # Safety
/// `p` is NULL or points at `len` readable bytes that live for `'a`.
pub unsafe fn bytes_arg<'a>(p: *const u8, len: usize, what: &str) -> Result<&'a [u8], Error> {
    if len == 0 {
        return Ok(&[]);
    }
    if p.is_null() {
        return Err(Error::Argument(format!("{what} is NULL")));
    }
    // SAFETY: the caller's promise above.
    Ok(unsafe { std::slice::from_raw_parts(p, len) })
}

/// Copies `bytes` into the caller's buffer: OK with `*len` = bytes.len(), or TOO_SMALL with
/// `*len` = the capacity needed (nothing written).
///
/// # Safety
/// `buf` is NULL or points at `cap` writable bytes; `len` is NULL or writable.
pub unsafe fn write_bytes(
    bytes: &[u8],
    buf: *mut u8,
    cap: usize,
    len: *mut usize,
) -> Result<i32, Error> {
    if len.is_null() {
        return Err(Error::Argument("len is NULL".into()));
    }
    if bytes.len() > cap || (buf.is_null() && !bytes.is_empty()) {
        // SAFETY: `len` is writable (checked above, promised by the caller).
        unsafe { *len = bytes.len() };
        return Ok(TOO_SMALL);
    }
    if !bytes.is_empty() {
        // SAFETY: `buf` has room for `cap >= bytes.len()` bytes; the ranges cannot overlap.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), buf, bytes.len()) };
    }
    // SAFETY: as above.
    unsafe { *len = bytes.len() };
    Ok(OK)
}

/// Copies `text` and a NUL into the caller's buffer: OK with `*len` = the text's length
/// (without the NUL), or TOO_SMALL with `*len` = the capacity needed (the text and its NUL).
///
/// # Safety
/// As [`write_bytes`].
pub unsafe fn write_text(
    text: &str,
    buf: *mut c_char,
    cap: usize,
    len: *mut usize,
) -> Result<i32, Error> {
    if len.is_null() {
        return Err(Error::Argument("len is NULL".into()));
    }
    let need = text.len() + 1;
    if need > cap || buf.is_null() {
        // SAFETY: `len` is writable.
        unsafe { *len = need };
        return Ok(TOO_SMALL);
    }
    // SAFETY: `buf` has room for `cap >= need` bytes.
    unsafe {
        std::ptr::copy_nonoverlapping(text.as_ptr(), buf.cast::<u8>(), text.len());
        *buf.add(text.len()) = 0;
        *len = text.len();
    }
    Ok(OK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_too_small_gives_the_size_needed_and_writes_nothing() {
        let mut buf = [b'x' as c_char; 8];
        let mut len = 0usize;
        let r = unsafe { write_text("hello world", buf.as_mut_ptr(), buf.len(), &mut len) };
        assert_eq!(r.unwrap(), TOO_SMALL);
        assert_eq!(len, 12);
        assert!(buf.iter().all(|&c| c == b'x' as c_char));
        // Asking for the size with no buffer at all.
        let r = unsafe { write_text("hello world", std::ptr::null_mut(), 0, &mut len) };
        assert_eq!((r.unwrap(), len), (TOO_SMALL, 12));
        let mut big = [0 as c_char; 12];
        let r = unsafe { write_text("hello world", big.as_mut_ptr(), big.len(), &mut len) };
        assert_eq!((r.unwrap(), len), (OK, 11));
        let s = unsafe { CStr::from_ptr(big.as_ptr()) };
        assert_eq!(s.to_str().unwrap(), "hello world");
        let r = unsafe { write_text("", big.as_mut_ptr(), 1, &mut len) };
        assert_eq!((r.unwrap(), len), (OK, 0));
        assert!(unsafe { write_text("a", big.as_mut_ptr(), 12, std::ptr::null_mut()) }.is_err());
    }

    #[test]
    fn bytes_too_small_gives_the_size_needed() {
        let mut buf = [0u8; 3];
        let mut len = 0usize;
        let r = unsafe { write_bytes(&[1, 2, 3, 4], buf.as_mut_ptr(), 3, &mut len) };
        assert_eq!((r.unwrap(), len), (TOO_SMALL, 4));
        assert_eq!(buf, [0, 0, 0]);
        let r = unsafe { write_bytes(&[1, 2, 3], buf.as_mut_ptr(), 3, &mut len) };
        assert_eq!((r.unwrap(), len), (OK, 3));
        assert_eq!(buf, [1, 2, 3]);
        let r = unsafe { write_bytes(&[], std::ptr::null_mut(), 0, &mut len) };
        assert_eq!((r.unwrap(), len), (OK, 0));
    }

    #[test]
    fn arguments_are_checked() {
        let e = unsafe { str_arg(std::ptr::null(), "config_yaml") }.unwrap_err();
        assert_eq!(e.code(), ERR_ARGUMENT);
        assert!(e.to_string().contains("config_yaml"));
        let bad = [0xffu8 as c_char, 0];
        assert!(unsafe { str_arg(bad.as_ptr(), "x") }.is_err());
        let ok = c"yes";
        assert_eq!(unsafe { str_arg(ok.as_ptr(), "x") }.unwrap(), "yes");
        assert!(unsafe { bytes_arg(std::ptr::null(), 0, "cert") }
            .unwrap()
            .is_empty());
        assert!(unsafe { bytes_arg(std::ptr::null(), 3, "cert") }.is_err());
    }

    #[test]
    fn guard_turns_errors_and_panics_into_codes() {
        assert_eq!(guard(|| Ok(EMPTY)), EMPTY);
        assert_eq!(guard(|| Err(Error::Policy("bad rule".into()))), ERR_POLICY);
        assert_eq!(last_error(), "bad rule");
        let hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let r = guard(|| panic!("boom"));
        std::panic::set_hook(hook);
        assert_eq!(r, ERR_PANIC);
        assert!(last_error().contains("boom"));
    }
}
