// Command upload is the load generator of bench/upload.sh and
// bench/replicas.sh: many leaves uploading weights files at once over
// loopback, against branchkey or against a bare handler that only writes
// and fsyncs the body.
//
//	upload bare -addr 127.0.0.1:9100 -dir DIR
//	upload load -server URL [-admin-token T] [-leaves 50] [-mb 40] [-bare]
//	upload rounds -servers URL,URL,... -admin-token T [-leaves 300] [-mb 4] [-rounds 3]
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log"
	"mime/multipart"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/branchkey/branchkey/client"
	"github.com/branchkey/branchkey/weights"
)

func main() {
	if len(os.Args) < 2 {
		log.Fatal("usage: upload bare|load ...")
	}
	switch os.Args[1] {
	case "bare":
		bare(os.Args[2:])
	case "load":
		load(os.Args[2:])
	case "rounds":
		rounds(os.Args[2:])
	default:
		log.Fatalf("unknown mode %q", os.Args[1])
	}
}

// bare serves POST /v1/file/upload by writing the multipart file part to a
// file and fsyncing it: the floor any upload handler pays.
func bare(args []string) {
	fs := flag.NewFlagSet("bare", flag.ExitOnError)
	addr := fs.String("addr", "127.0.0.1:9100", "listen address")
	dir := fs.String("dir", os.TempDir(), "where bodies go")
	fs.Parse(args)
	var n atomic.Int64
	http.HandleFunc("POST /v1/file/upload", func(w http.ResponseWriter, r *http.Request) {
		mr, err := r.MultipartReader()
		if err != nil {
			http.Error(w, err.Error(), 400)
			return
		}
		for {
			p, err := mr.NextPart()
			if err == io.EOF {
				break
			} else if err != nil {
				http.Error(w, err.Error(), 400)
				return
			}
			if p.FormName() != "file" {
				io.Copy(io.Discard, p)
				continue
			}
			f, err := os.Create(filepath.Join(*dir, fmt.Sprintf("body-%d", n.Add(1))))
			if err != nil {
				http.Error(w, err.Error(), 500)
				return
			}
			_, err = io.Copy(f, p)
			if err == nil {
				err = f.Sync()
			}
			f.Close()
			if err != nil {
				http.Error(w, err.Error(), 500)
				return
			}
		}
		w.WriteHeader(201)
		io.WriteString(w, `{"data":{"file_id":"x"}}`)
	})
	log.Fatal(http.ListenAndServe(*addr, nil))
}

type leaf struct {
	name, password, id, token string
	server                    string
}

func load(args []string) {
	fs := flag.NewFlagSet("load", flag.ExitOnError)
	server := fs.String("server", "http://127.0.0.1:8080", "server URL")
	token := fs.String("admin-token", os.Getenv("BRANCHKEY_ADMIN_TOKEN"), "admin token (branchkey only)")
	leaves := fs.Int("leaves", 50, "concurrent leaves")
	mb := fs.Int("mb", 40, "update size in MB")
	isBare := fs.Bool("bare", false, "the server is the bare handler")
	fs.Parse(args)
	ctx := context.Background()

	params := *mb * 1_000_000 / 4
	u := &weights.Update{NumSamples: 100, Tensors: []weights.Tensor{
		{DType: weights.Float32, Shape: []int{params / 2}, Data: make([]byte, 4*(params/2))},
		{DType: weights.Float32, Shape: []int{params - params/2}, Data: make([]byte, 4*(params-params/2))},
	}}
	for i := range u.Tensors[0].Data {
		u.Tensors[0].Data[i] = byte(i % 61) // finite float32s
	}
	var file bytes.Buffer
	if err := weights.Encode(&file, u); err != nil {
		log.Fatal(err)
	}

	ls := make([]*leaf, *leaves)
	for i := range ls {
		ls[i] = &leaf{name: fmt.Sprintf("l%d", i), id: "x", token: "x"}
	}
	if !*isBare {
		a, err := client.NewAdmin(*server, *token, nil)
		if err != nil {
			log.Fatal(err)
		}
		tree := fmt.Sprintf("bench-%d", time.Now().UnixNano())
		if _, err := a.CreateTree(ctx, tree); err != nil {
			log.Fatal(err)
		}
		n := *leaves
		if _, err := a.CreateBranch(ctx, tree, client.BranchSpec{ID: "b", MinUpdates: &n}); err != nil {
			log.Fatal(err)
		}
		for i, l := range ls {
			nl, err := a.CreateLeaf(ctx, tree, "b", fmt.Sprintf("%s-leaf%d", tree, i), "")
			if err != nil {
				log.Fatal(err)
			}
			l.name, l.password = nl.Name, nl.Password
			if err := login(*server, l, tree); err != nil {
				log.Fatal(err)
			}
		}
	}

	lat := make([]time.Duration, len(ls))
	var wg sync.WaitGroup
	start := time.Now()
	for i, l := range ls {
		wg.Add(1)
		go func() {
			defer wg.Done()
			t0 := time.Now()
			if err := upload(*server, l, file.Bytes()); err != nil {
				log.Fatalf("leaf %d: %v", i, err)
			}
			lat[i] = time.Since(t0)
		}()
	}
	wg.Wait()
	wall := time.Since(start)
	slices.Sort(lat)
	total := float64(len(ls) * file.Len())
	out := map[string]any{
		"leaves": len(ls), "bytes_each": file.Len(), "seconds": wall.Seconds(),
		"mb_per_s": total / wall.Seconds() / 1e6,
		"p50_s":    lat[len(lat)/2].Seconds(), "p99_s": lat[(len(lat)*99+99)/100-1].Seconds(),
	}
	json.NewEncoder(os.Stdout).Encode(out)
}

func login(server string, l *leaf, tree string) error {
	body, _ := json.Marshal(map[string]string{"tree_id": tree, "branch_id": "b"})
	req, _ := http.NewRequest("PUT", server+"/v1/leaf/login", bytes.NewReader(body))
	req.SetBasicAuth(l.name, l.password)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	var out struct {
		Data map[string]string `json:"data"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&out); err != nil || resp.StatusCode != 201 {
		return fmt.Errorf("login %s: %d %v", l.name, resp.StatusCode, err)
	}
	l.id, l.token = out.Data["id"], out.Data["access_token"]
	return nil
}

// upload streams the multipart body the published client sends.
func upload(server string, l *leaf, file []byte) error {
	pr, pw := io.Pipe()
	mw := multipart.NewWriter(pw)
	go func() {
		meta, _ := json.Marshal(map[string]string{"leaf_name": l.name, "metadata": "bench"})
		mw.WriteField("data", string(meta))
		fw, _ := mw.CreateFormFile("file", "weights.npy")
		fw.Write(file)
		pw.CloseWithError(mw.Close())
	}()
	req, _ := http.NewRequest("POST", server+"/v1/file/upload", pr)
	req.SetBasicAuth(l.id, l.token)
	req.Header.Set("Content-Type", mw.FormDataContentType())
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 201 {
		return fmt.Errorf("%d %s", resp.StatusCode, b)
	}
	return nil
}

// rounds runs whole rounds: every leaf (spread over the servers) uploads,
// the round aggregates. It reports the ingest rate of each round (bytes of
// all uploads over the time from the first upload's start to the last
// one's 201) and its latency (from the last 201 to the aggregation being
// recorded, as the admin API shows it).
func rounds(args []string) {
	fs := flag.NewFlagSet("rounds", flag.ExitOnError)
	servers := fs.String("servers", "http://127.0.0.1:8080", "comma-separated server URLs; leaf i uses server i mod n")
	token := fs.String("admin-token", os.Getenv("BRANCHKEY_ADMIN_TOKEN"), "admin token")
	nLeaves := fs.Int("leaves", 300, "leaves")
	mb := fs.Float64("mb", 4, "update size in MB")
	nRounds := fs.Int("rounds", 3, "rounds")
	conc := fs.Int("concurrency", 100, "uploads in flight at once")
	fs.Parse(args)
	ctx := context.Background()
	urls := strings.Split(*servers, ",")
	a, err := client.NewAdmin(urls[0], *token, nil)
	if err != nil {
		log.Fatal(err)
	}
	tree := fmt.Sprintf("bench-%d", time.Now().UnixNano())
	if _, err := a.CreateTree(ctx, tree); err != nil {
		log.Fatal(err)
	}
	if _, err := a.CreateBranch(ctx, tree, client.BranchSpec{ID: "b", MinUpdates: nLeaves}); err != nil {
		log.Fatal(err)
	}
	ls := make([]*leaf, *nLeaves)
	sem := make(chan struct{}, 8)
	var wg sync.WaitGroup
	for i := range ls {
		wg.Add(1)
		go func() {
			defer wg.Done()
			sem <- struct{}{}
			defer func() { <-sem }()
			nl, err := a.CreateLeaf(ctx, tree, "b", fmt.Sprintf("%s-leaf%d", tree, i), "")
			if err != nil {
				log.Fatal(err)
			}
			l := &leaf{name: nl.Name, password: nl.Password, server: urls[i%len(urls)]}
			if err := login(l.server, l, tree); err != nil {
				log.Fatal(err)
			}
			ls[i] = l
		}()
	}
	wg.Wait()
	params := int(*mb * 1e6 / 4)
	u := &weights.Update{NumSamples: 10, Tensors: []weights.Tensor{{DType: weights.Float32, Shape: []int{params}, Data: make([]byte, 4*params)}}}
	var file bytes.Buffer
	if err := weights.Encode(&file, u); err != nil {
		log.Fatal(err)
	}
	for r := 1; r <= *nRounds; r++ {
		start := time.Now()
		sem := make(chan struct{}, *conc)
		for _, l := range ls {
			wg.Add(1)
			go func() {
				defer wg.Done()
				sem <- struct{}{}
				defer func() { <-sem }()
				if err := upload(l.server, l, file.Bytes()); err != nil {
					log.Fatalf("round %d: %v", r, err)
				}
			}()
		}
		wg.Wait()
		ingest := time.Since(start)
		acked := time.Now()
		var aggSec float64
		var mode string
		for {
			aggs, err := a.ListAggregations(ctx, tree, "b")
			if err == nil && len(aggs) >= r {
				aggSec, mode = aggs[r-1].Duration.Seconds(), aggs[r-1].Mode
				break
			}
			time.Sleep(5 * time.Millisecond)
		}
		latency := time.Since(acked)
		json.NewEncoder(os.Stdout).Encode(map[string]any{
			"round": r, "servers": len(urls), "leaves": len(ls), "bytes_each": file.Len(),
			"ingest_s": ingest.Seconds(), "ingest_mb_per_s": float64(len(ls)*file.Len()) / ingest.Seconds() / 1e6,
			"round_latency_s": latency.Seconds(), "aggregation_s": aggSec, "mode": mode,
		})
	}
}
