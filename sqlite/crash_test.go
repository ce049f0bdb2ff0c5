package sqlite_test

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/branchkey/branchkey"
	"github.com/branchkey/branchkey/sqlite"
)

// crashChildEnv names the database a re-executed test binary writes to
// until it is killed.
const crashChildEnv = "BRANCHKEY_SQLITE_CRASH_CHILD"

// TestKillNine pins durability across a crash of the process: every write
// whose method returned before a SIGKILL is there when the database is
// opened again. (Power loss is covered by synchronous=FULL, which
// TestPragmas pins; it cannot be simulated here.)
func TestKillNine(t *testing.T) {
	if path := os.Getenv(crashChildEnv); path != "" {
		crashChild(path)
		return
	}
	if testing.Short() {
		t.Skip("re-executes the test binary")
	}
	path := filepath.Join(t.TempDir(), "branchkey.db")
	cmd := exec.Command(os.Args[0], "-test.run=^TestKillNine$", "-test.count=1")
	cmd.Env = append(os.Environ(), crashChildEnv+"="+path)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var acked []string
	sc := bufio.NewScanner(out)
	for sc.Scan() {
		acked = append(acked, sc.Text())
		if len(acked) == 200 {
			break
		}
	}
	if err := cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	_ = cmd.Wait()
	if len(acked) < 200 {
		t.Fatalf("the child acknowledged only %d writes before it ended", len(acked))
	}

	s := mustOpenPath(t, path)
	defer s.Close()
	for _, id := range acked {
		if _, err := s.FindTree(context.Background(), id); err != nil {
			t.Fatalf("acknowledged tree %s lost after kill -9: %v", id, err)
		}
	}
}

// crashChild writes trees as fast as it can, printing each id once it is
// committed, until the parent kills it.
func crashChild(path string) {
	ctx := context.Background()
	s, err := sqlite.Open(ctx, path)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	for i := 0; ; i++ {
		id := fmt.Sprintf("t%06d", i)
		if err := s.CreateTree(ctx, &branchkey.Tree{ID: id}); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(2)
		}
		fmt.Println(id)
	}
}
