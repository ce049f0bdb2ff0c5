package client

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"strconv"
	"strings"

	"github.com/branchkey/branchkey"
)

// DefaultAMQPPort is the broker port when the credentials name a host but
// no port, as in the published Python client.
const DefaultAMQPPort = 5672

// Credentials identify a leaf. The JSON keys are the published Python
// client's, so one credentials file serves both clients.
//
// Host (or ResponseHost) and Port name the AMQP broker that notifications
// come from; when both hosts are empty the client receives notifications
// over the server's Server-Sent Events instead. The broker's user and
// password are not in the credentials: they are the leaf id and the access
// token login returns (wire-v1.md). QueuePassword is read and written for
// compatibility with existing credentials files but never used: the broker
// only accepts the current access token.
type Credentials struct {
	LeafName      string `json:"leaf_name"`
	LeafPassword  string `json:"leaf_password"`
	TreeID        string `json:"tree_id"`
	BranchID      string `json:"branch_id"`
	QueuePassword string `json:"queue_password,omitempty"`
	Host          string `json:"host,omitempty"`
	ResponseHost  string `json:"response_host,omitempty"`
	// Port is the broker's AMQP port; 0 means DefaultAMQPPort. In JSON it
	// may be a number or a string of digits, and may be absent.
	Port int `json:"port,omitempty"`
}

// UnmarshalJSON reads credentials, accepting the port as a number or a
// string ("5672"), as credentials files written by hand often have it.
func (c *Credentials) UnmarshalJSON(b []byte) error {
	type plain Credentials
	var v struct {
		plain
		Port json.RawMessage `json:"port"`
	}
	if err := json.Unmarshal(b, &v); err != nil {
		return err
	}
	*c = Credentials(v.plain)
	c.Port = 0
	p := bytes.TrimSpace(v.Port)
	if len(p) == 0 || string(p) == "null" || string(p) == `""` {
		return nil
	}
	if p[0] == '"' {
		var s string
		if err := json.Unmarshal(p, &s); err != nil {
			return err
		}
		p = []byte(strings.TrimSpace(s))
	}
	n, err := strconv.Atoi(string(p))
	if err != nil || n < 0 || n > 65535 {
		return fmt.Errorf("port %s is not a TCP port number", v.Port)
	}
	c.Port = n
	return nil
}

// BrokerHost returns the AMQP broker's host: ResponseHost when set, else
// Host; "" means notifications come over Server-Sent Events.
func (c Credentials) BrokerHost() string {
	if h := strings.TrimSpace(c.ResponseHost); h != "" {
		return h
	}
	return strings.TrimSpace(c.Host)
}

// BrokerPort returns Port, or DefaultAMQPPort when it is unset.
func (c Credentials) BrokerPort() int {
	if c.Port > 0 {
		return c.Port
	}
	return DefaultAMQPPort
}

// Validate reports the missing fields a login needs, as an EINVALID error.
func (c Credentials) Validate() error {
	var missing []string
	for _, f := range []struct{ key, val string }{
		{"leaf_name", c.LeafName}, {"leaf_password", c.LeafPassword}, {"tree_id", c.TreeID}, {"branch_id", c.BranchID},
	} {
		if f.val == "" {
			missing = append(missing, f.key)
		}
	}
	if len(missing) > 0 {
		return &Error{Code: branchkey.EINVALID, Message: "credentials lack " + strings.Join(missing, ", ")}
	}
	if c.Port < 0 || c.Port > 65535 {
		return &Error{Code: branchkey.EINVALID, Message: fmt.Sprintf("credentials: port %d is not a TCP port number", c.Port)}
	}
	return nil
}

// envKeys maps each credentials field to its environment variable.
var envKeys = []struct {
	name  string
	field func(*Credentials) *string
}{
	{"BRANCHKEY_LEAF_NAME", func(c *Credentials) *string { return &c.LeafName }},
	{"BRANCHKEY_LEAF_PASSWORD", func(c *Credentials) *string { return &c.LeafPassword }},
	{"BRANCHKEY_TREE_ID", func(c *Credentials) *string { return &c.TreeID }},
	{"BRANCHKEY_BRANCH_ID", func(c *Credentials) *string { return &c.BranchID }},
	{"BRANCHKEY_QUEUE_PASSWORD", func(c *Credentials) *string { return &c.QueuePassword }},
	{"BRANCHKEY_HOST", func(c *Credentials) *string { return &c.Host }},
	{"BRANCHKEY_RESPONSE_HOST", func(c *Credentials) *string { return &c.ResponseHost }},
}

// CredentialsFromEnv reads credentials from the non-empty variables of the environment:
// BRANCHKEY_LEAF_NAME, BRANCHKEY_LEAF_PASSWORD, BRANCHKEY_TREE_ID,
// BRANCHKEY_BRANCH_ID, BRANCHKEY_QUEUE_PASSWORD, BRANCHKEY_HOST,
// BRANCHKEY_RESPONSE_HOST and BRANCHKEY_PORT. It does not check that they
// are complete; New does.
func CredentialsFromEnv() (Credentials, error) {
	var c Credentials
	return c, c.applyEnv(os.LookupEnv)
}

// applyEnv sets every field whose variable lookup finds non-empty.
func (c *Credentials) applyEnv(lookup func(string) (string, bool)) error {
	for _, k := range envKeys {
		if v, ok := lookup(k.name); ok && v != "" {
			*k.field(c) = v
		}
	}
	if v, ok := lookup("BRANCHKEY_PORT"); ok && strings.TrimSpace(v) != "" {
		n, err := strconv.Atoi(strings.TrimSpace(v))
		if err != nil || n <= 0 || n > 65535 {
			return fmt.Errorf("BRANCHKEY_PORT=%q is not a TCP port number", v)
		}
		c.Port = n
	}
	return nil
}

// LoadCredentials reads a credentials file in the Python client's JSON
// format. Any BRANCHKEY_* credentials variable that is set (see
// CredentialsFromEnv) overrides the file's field, so a password can stay
// out of the file. An empty path reads the environment only.
func LoadCredentials(path string) (Credentials, error) {
	if path == "" {
		return CredentialsFromEnv()
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return Credentials{}, fmt.Errorf("read credentials: %w", err)
	}
	var c Credentials
	if err := json.Unmarshal(b, &c); err != nil {
		return Credentials{}, fmt.Errorf("credentials file %s: %w", path, err)
	}
	if err := c.applyEnv(os.LookupEnv); err != nil {
		return Credentials{}, err
	}
	return c, nil
}
