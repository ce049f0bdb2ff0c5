// Package client talks to a branchkey server: the leaf side (log in, upload
// and download weights files, receive notifications) and the admin API.
// Errors the server answers are *Error values carrying its code and
// message, matched with errors.As.
package client
