package branchkey

import "strings"

// MaxBlobKeyLen is the longest blob key, in bytes.
const MaxBlobKeyLen = 1024

// ValidBlobKey reports whether key can name a blob, and if not, why: a
// relative, slash-separated path of non-empty segments other than "." and
// "..", made of letters, digits, '.', '_', '-' and '/', at most
// MaxBlobKeyLen bytes. Every BlobStore refuses other keys with EINVALID.
func ValidBlobKey(key string) error {
	if key == "" {
		return Errorf(EINVALID, "blob key is empty")
	}
	if len(key) > MaxBlobKeyLen {
		return Errorf(EINVALID, "blob key is %d bytes long, at most %d are allowed", len(key), MaxBlobKeyLen)
	}
	for i := 0; i < len(key); i++ {
		c := key[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '.' || c == '_' || c == '-' || c == '/') {
			return Errorf(EINVALID, "blob key %q has %q at byte %d; only letters, digits and . _ - / are allowed", key, c, i)
		}
	}
	if key[0] == '/' {
		return Errorf(EINVALID, "blob key %q is absolute", key)
	}
	for _, seg := range strings.Split(key, "/") {
		switch seg {
		case "":
			return Errorf(EINVALID, "blob key %q has an empty segment", key)
		case ".", "..":
			return Errorf(EINVALID, "blob key %q has a %q segment", key, seg)
		}
	}
	return nil
}
