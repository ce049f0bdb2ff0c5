// Package client talks to a branchkey server: the leaf side (log in, upload
// and download weights files, receive notifications) and the admin API.
// Errors the server answers are *Error values carrying its code and
// message, matched with errors.As.
//
// # Leaves
//
// A Client does what the published Python client does, over the same wire
// contract (shared/spec/wire-v1.md), and more:
//
//   - Login logs in (PUT /v1/leaf/login) and starts a consumer goroutine
//     whose notifications arrive on Updates: aggregation_status when an
//     aggregate is ready, run_status when the branch's run changes. They
//     come over AMQP from the broker the credentials name (virtual host =
//     tree, user = leaf id, password = access token, the leaf's own queue,
//     manual acks), or, when the credentials name no broker host, over the
//     server's Server-Sent Events (GET /v1/events). Both reconnect with
//     backoff; the event stream resumes after the last event id delivered,
//     and AMQP redeliveries are dropped by message id.
//   - FileUpload checks a file with the weights codec and streams it
//     (POST /v1/file/upload) as the published client's multipart body,
//     under an Idempotency-Key that its retries reuse, so a retried upload
//     counts once.
//   - FileDownload streams a file (GET /v1/file/download/{id}) into
//     ./aggregated_files/<id> (see WithDownloadDir), resuming an interrupted
//     transfer with a Range request, checking the result with the codec and
//     renaming it into place atomically.
//   - Logout (PUT /v1/leaf/logout) revokes the leaf's tokens.
//
// Every call takes a context and honours its cancellation. Transient
// failures (the server not reached, a broken connection, 429, 500, 502,
// 503, 504, a transfer that stalls) are retried with exponential backoff
// (see RetryPolicy); a 401 makes the client log in again once, since the
// access token expires. Memory does not grow with file sizes: files move
// in 256 KiB pieces.
//
// # Credentials and sessions
//
// Credentials use the Python client's JSON keys (leaf_name, leaf_password,
// tree_id, branch_id, queue_password, host/response_host, port) and load
// from a file (LoadCredentials) or from BRANCHKEY_* variables
// (CredentialsFromEnv). The server's HTTP URL is not part of them: it is
// WithServer's (DefaultServer otherwise). queue_password is kept for
// compatibility and not used: the broker's password for a leaf is the
// access token of its latest login.
//
// A Session (leaf id and access token) can be saved and given to a later
// Client with WithSession, so a new process reuses the login; the
// branchkey CLI keeps its sessions that way, in files only their owner can
// read.
package client
