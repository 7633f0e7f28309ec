// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The control socket's asking side, used by `vhost-tmem ctl` and `vhost-tmem stats`.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use super::{Error, Request, Response};

/// Sends one request to a daemon's control socket and returns its answer.
pub fn request(path: &Path, req: &Request) -> Result<Response, Error> {
    let mut s = UnixStream::connect(path).map_err(|source| Error::Connect {
        path: path.to_owned(),
        source,
    })?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.set_write_timeout(Some(Duration::from_secs(30)))?;
    let mut line = serde_json::to_string(req).map_err(io::Error::other)?;
    line.push('\n');
    // A daemon that refuses the connection answers and closes at once: read its answer even
    // if sending the request failed.
    let sent = s
        .write_all(line.as_bytes())
        .and_then(|()| s.shutdown(std::net::Shutdown::Write));
    let mut answer = String::new();
    let read = BufReader::new(s).read_line(&mut answer);
    if answer.is_empty() {
        sent?;
        read?;
    }
    let resp: Response = serde_json::from_str(&answer).map_err(Error::BadAnswer)?;
    if !resp.ok {
        return Err(Error::Refused(resp.error.unwrap_or_default()));
    }
    Ok(resp)
}
