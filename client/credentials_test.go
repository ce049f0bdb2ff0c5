package client_test

import (
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/branchkey/branchkey"
	"github.com/branchkey/branchkey/client"
)

func TestLoadCredentials(t *testing.T) {
	write := func(t *testing.T, body string) string {
		path := filepath.Join(t.TempDir(), "credentials.json")
		if err := os.WriteFile(path, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
		return path
	}
	full := `{"leaf_name": "l", "leaf_password": "p", "tree_id": "t", "branch_id": "b", "queue_password": "q", "host": "h", "port": 5673}`

	t.Run("OK", func(t *testing.T) {
		c, err := client.LoadCredentials(write(t, full))
		if err != nil {
			t.Fatal(err)
		}
		want := client.Credentials{LeafName: "l", LeafPassword: "p", TreeID: "t", BranchID: "b", QueuePassword: "q", Host: "h", Port: 5673}
		if c != want || c.BrokerHost() != "h" || c.BrokerPort() != 5673 {
			t.Fatalf("got %+v", c)
		}
	})
	t.Run("PortString", func(t *testing.T) {
		c, err := client.LoadCredentials(write(t, `{"leaf_name": "l", "port": " 5674 ", "response_host": "r", "host": "h"}`))
		if err != nil || c.Port != 5674 || c.BrokerHost() != "r" {
			t.Fatalf("got %+v, %v", c, err)
		}
	})
	t.Run("NoHost", func(t *testing.T) {
		c, err := client.LoadCredentials(write(t, `{"leaf_name": "l", "port": ""}`))
		if err != nil || c.BrokerHost() != "" || c.BrokerPort() != client.DefaultAMQPPort {
			t.Fatalf("got %+v, %v", c, err)
		}
	})
	t.Run("EnvOverrides", func(t *testing.T) {
		t.Setenv("BRANCHKEY_LEAF_PASSWORD", "from-env")
		t.Setenv("BRANCHKEY_PORT", "6000")
		t.Setenv("BRANCHKEY_HOST", "")
		c, err := client.LoadCredentials(write(t, full))
		if err != nil || c.LeafPassword != "from-env" || c.Port != 6000 || c.Host != "h" {
			t.Fatalf("got %+v, %v", c, err)
		}
	})
	t.Run("EnvOnly", func(t *testing.T) {
		for k, v := range map[string]string{"BRANCHKEY_LEAF_NAME": "l", "BRANCHKEY_LEAF_PASSWORD": "p", "BRANCHKEY_TREE_ID": "t",
			"BRANCHKEY_BRANCH_ID": "b", "BRANCHKEY_RESPONSE_HOST": "r"} {
			t.Setenv(k, v)
		}
		c, err := client.LoadCredentials("")
		if err != nil || c.Validate() != nil || c.BrokerHost() != "r" {
			t.Fatalf("got %+v, %v", c, err)
		}
	})
	t.Run("RoundTrip", func(t *testing.T) {
		c, _ := client.LoadCredentials(write(t, full))
		b, err := json.Marshal(c)
		if err != nil {
			t.Fatal(err)
		}
		var back client.Credentials
		if err := json.Unmarshal(b, &back); err != nil || back != c {
			t.Fatalf("%s: %+v, %v", b, back, err)
		}
	})
	for name, body := range map[string]string{
		"ErrPort":   `{"port": 70000}`,
		"ErrPortNS": `{"port": "amqp"}`,
		"ErrJSON":   `{"leaf_name": `,
	} {
		t.Run(name, func(t *testing.T) {
			if _, err := client.LoadCredentials(write(t, body)); err == nil {
				t.Fatal("no error")
			}
		})
	}
	t.Run("ErrMissingFile", func(t *testing.T) {
		if _, err := client.LoadCredentials(filepath.Join(t.TempDir(), "none.json")); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("got %v", err)
		}
	})
	t.Run("ErrEnvPort", func(t *testing.T) {
		t.Setenv("BRANCHKEY_PORT", "x")
		if _, err := client.CredentialsFromEnv(); err == nil {
			t.Fatal("no error")
		}
	})
}

func TestNew(t *testing.T) {
	ok := client.Credentials{LeafName: "l", LeafPassword: "p", TreeID: "t", BranchID: "b"}
	for _, tc := range []struct {
		name  string
		creds client.Credentials
		opts  []client.Option
	}{
		{"ErrMissing", client.Credentials{LeafName: "l"}, nil},
		{"ErrServer", ok, []client.Option{client.WithServer("127.0.0.1:8080")}},
		{"ErrAMQPWithoutHost", ok, []client.Option{client.WithTransport(client.TransportAMQP)}},
		{"ErrTransport", ok, []client.Option{client.WithTransport("carrier-pigeon")}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := client.New(tc.creds, tc.opts...)
			mustCode(t, err, branchkey.EINVALID)
		})
	}
	c, err := client.New(ok, client.WithServer("http://example.org:8080/"))
	if err != nil || c.Server() != "http://example.org:8080" || c.DownloadDir() != client.DefaultDownloadDir || c.Session() != nil {
		t.Fatalf("New = %v, %v", c, err)
	}
}
