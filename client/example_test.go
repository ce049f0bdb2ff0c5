package client_test

import (
	"context"
	"errors"
	"fmt"
	"log"
	"net/http"
	"net/http/httptest"
	"os"
	"os/signal"
	"path/filepath"

	"github.com/branchkey/branchkey"
	"github.com/branchkey/branchkey/client"
)

// A leaf's life: log in, upload this round's weights, wait for the
// aggregate, download it, and carry on training from it.
func Example() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()

	creds, err := client.LoadCredentials("credentials.json")
	if err != nil {
		log.Fatal(err)
	}
	c, err := client.New(creds, client.WithServer("https://branchkey.example.org"))
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()
	if err := c.Login(ctx); err != nil {
		log.Fatal(err)
	}
	id, err := c.FileUpload(ctx, "weights.npy", client.WithMetadata("epoch 3"))
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("uploaded update", id)
	for n := range c.Updates() {
		switch n.Type {
		case branchkey.MessageAggregationStatus:
			path, err := c.FileDownload(ctx, n.AggregationID)
			if err != nil {
				log.Fatal(err)
			}
			fmt.Printf("round %d aggregated from %d samples: %s\n", n.Round, n.NumSamples, path)
			// Load path, train, upload again...
		case branchkey.MessageRunStatus:
			fmt.Println("run is now", n.RunStatus)
		}
	}
	if err := c.Err(); err != nil {
		log.Fatal(err)
	}
}

// Credentials files are the Python client's; the port may be a number or a
// string, and BRANCHKEY_* variables override fields.
func ExampleLoadCredentials() {
	dir, _ := os.MkdirTemp("", "example")
	defer os.RemoveAll(dir)
	path := filepath.Join(dir, "credentials.json")
	os.WriteFile(path, []byte(`{
		"leaf_name": "hospital-7", "leaf_password": "s3cret",
		"tree_id": "oncology", "branch_id": "resnet",
		"queue_password": "unused", "response_host": "rabbit.example.org", "port": "5673"
	}`), 0o600)

	creds, err := client.LoadCredentials(path)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(creds.LeafName, creds.TreeID, creds.BranchID)
	fmt.Println("notifications from", creds.BrokerHost(), creds.BrokerPort())
	// Output:
	// hospital-7 oncology resnet
	// notifications from rabbit.example.org 5673
}

// Errors carry the server's status, code and message; match them with
// errors.As (or branchkey.ErrorCode).
func ExampleError() {
	// A server that refuses the password, as branchkey does.
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusUnauthorized)
		fmt.Fprint(w, `{"code": "unauthorized", "message": "invalid leaf name or password"}`)
	}))
	defer srv.Close()

	c, _ := client.New(client.Credentials{LeafName: "hospital-7", LeafPassword: "wrong", TreeID: "oncology", BranchID: "resnet"},
		client.WithServer(srv.URL))
	err := c.Login(context.Background())
	var e *client.Error
	if errors.As(err, &e) {
		fmt.Println(e.Status, e.Code, e.Message, e.Temporary())
	}
	fmt.Println(branchkey.ErrorCode(err) == branchkey.EUNAUTHORIZED)
	// Output:
	// 401 unauthorized invalid leaf name or password false
	// true
}

// Progress reports let a program draw its own progress bar.
func ExampleWithProgress() {
	creds, _ := client.CredentialsFromEnv()
	c, err := client.New(creds, client.WithProgress(func(p client.Progress) {
		if p.Finished {
			fmt.Fprintf(os.Stderr, "\r%s %s: done\n", p.Op, p.Name)
			return
		}
		if p.Total > 0 {
			fmt.Fprintf(os.Stderr, "\r%s %s: %3d%%", p.Op, p.Name, 100*p.Done/p.Total)
		}
	}))
	if err != nil {
		log.Fatal(err)
	}
	if _, err := c.FileUpload(context.Background(), "weights.npy"); err != nil {
		log.Fatal(err)
	}
}

// A process that runs once per round can keep its login, and its place in
// the event stream, from one run to the next.
func ExampleWithSession() {
	creds, _ := client.CredentialsFromEnv()
	var saved client.Session // loaded from where the last run kept it
	c, err := client.New(creds, client.WithSession(saved), client.WithLastEventID("41"))
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()
	if err := c.Login(context.Background()); err != nil { // logs in again only if the session is refused
		log.Fatal(err)
	}
	n := <-c.Updates()
	fmt.Println(n.AggregationID)
	saved = *c.Session() // keep it, with c.LastEventID(), for the next run
}
