// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! vhost-tmem: a transcendent memory (tmem) backend for virtio guests over vhost-user.

pub mod store;
pub mod vhu_tmem;
